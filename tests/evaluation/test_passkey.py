"""train.evaluation.passkey: the samples bury the key at its depth and mark its answer."""

from __future__ import annotations

import pytest
from text_corpus import text_corpus

from train import data
from train.evaluation import passkey


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("passkey"))


def test_passkey_samples_bury_the_key_and_mark_its_answer(built):
    tok = data.load_tokenizer(built / "tokenizer.json")
    filler = data.read_tokens(built / "heldout")
    for depth in (0.0, 0.5, 1.0):
        samples, masks, keys = passkey.passkey_samples(tok, filler, length=200, depth=depth,
                                                       count=3, seed=4)
        assert samples.shape == masks.shape == (3, 200)
        for row, mask, key in zip(samples, masks, keys):
            answer = tok.encode(passkey.ANSWER.format(key=key)).ids
            needle = tok.encode(passkey.NEEDLE.format(key=key)).ids
            # The positions marked are those whose next token is an answer token.
            assert row[1:][mask[:-1]].tolist() == answer and mask.sum() == len(answer)
            starts = [i for i in range(200 - len(needle)) if
                      row[i:i + len(needle)].tolist() == needle]
            assert len(starts) == 1
            filler_len = 200 - len(needle) - len(answer) - len(tok.encode(passkey.QUESTION).ids)
            assert starts[0] == round(depth * filler_len)
    with pytest.raises(ValueError, match="depth"):
        passkey.passkey_samples(tok, filler, length=200, depth=1.5, count=1)
    with pytest.raises(ValueError, match="cannot hold"):
        passkey.passkey_samples(tok, filler, length=10, depth=0.5, count=1)
