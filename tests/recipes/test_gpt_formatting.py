"""Input formatting of the three GLUE task types (thesis Sec. 7.1.1) and the LM loss."""

import math

import pytest
import torch

from recipes.nlp.losses import IGNORE, formatted_lm_loss, lm_targets
from recipes.nlp.tasks import PAD_ID, SpecialTokens, encode_split, format_example, get_task

V = 100
TOK = SpecialTokens(V)
S, E, D = V, V + 1, V + 2


def test_special_token_ids_follow_the_vocabulary():
    assert (TOK.start, TOK.end, TOK.delimiter) == (100, 101, 102)
    assert get_task("sst2").num_special_tokens == 2  # V + 2 rows for classification
    assert get_task("rte").num_special_tokens == 3  # V + 3 for entailment / similarity
    assert get_task("STS-B").name == "stsb"


@pytest.mark.parametrize("task", ["cola", "sst2"])
def test_classification_is_start_text_end(task):
    assert format_example(get_task(task), [5, 6, 7], None, TOK) == [[S, 5, 6, 7, E]]


@pytest.mark.parametrize("task", ["rte", "qnli"])
def test_entailment_is_start_premise_delimiter_hypothesis_end(task):
    assert format_example(get_task(task), [5, 6], [8, 9, 10], TOK) == [[S, 5, 6, D, 8, 9, 10, E]]


@pytest.mark.parametrize("task", ["mrpc", "qqp", "stsb"])
def test_similarity_gives_both_orders(task):
    views = format_example(get_task(task), [5, 6], [8, 9, 10], TOK)
    assert views == [[S, 5, 6, D, 8, 9, 10, E], [S, 8, 9, 10, D, 5, 6, E]]


def test_wrong_number_of_texts_is_rejected():
    with pytest.raises(ValueError, match="one text"):
        format_example(get_task("sst2"), [1], [2], TOK)
    with pytest.raises(ValueError, match="two texts"):
        format_example(get_task("rte"), [1], None, TOK)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        get_task("mnli")


def _tokenize(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def test_encode_split_drops_long_sequences_and_pads_the_rest():
    spec = get_task("mrpc")
    a = ["1 2", "1 2 3 4 5 6", "7"]
    b = ["3", "4", "8 9"]
    enc = encode_split(spec, a, b, [1, 0, 1], _tokenize, TOK, context=7)
    assert enc.dropped == 1  # "1 2 3 4 5 6" + "4" gives 10 tokens > 7
    assert enc.input_ids.shape == (2, 2, 6)
    assert enc.lengths.tolist() == [[6, 6], [6, 6]]
    assert enc.input_ids[0, 0].tolist() == [S, 1, 2, D, 3, E]
    assert enc.input_ids[0, 1].tolist() == [S, 3, D, 1, 2, E]
    assert enc.input_ids[1, 1].tolist() == [S, 8, 9, D, 7, E]
    assert enc.labels.tolist() == [1, 1]
    single = encode_split(get_task("sst2"), ["1", "1 2 3"], None, [0, 1], _tokenize, TOK, 10)
    assert single.input_ids[0, 0].tolist() == [S, 1, E, PAD_ID, PAD_ID]
    assert single.lengths[:, 0].tolist() == [3, 5]
    regression = encode_split(get_task("stsb"), ["1"], ["2"], [3.4], _tokenize, TOK, 10)
    assert regression.labels.dtype == torch.float32


def test_encode_split_rejects_a_split_with_nothing_left():
    with pytest.raises(ValueError, match="context window"):
        encode_split(get_task("sst2"), ["1 2 3"], None, [0], _tokenize, TOK, context=3)


def test_lm_targets_ignore_padding_and_one_view_is_token_mean_cross_entropy():
    ids = torch.tensor([[[S, 1, E, 0]], [[S, 1, 2, E]]])
    lengths = torch.tensor([[3], [4]])
    targets = lm_targets(ids, lengths)
    assert targets.tolist() == [[[1, E, IGNORE]], [[1, 2, E]]]
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 110)
    flat = torch.nn.functional.cross_entropy(
        logits[:, 0, :-1].reshape(-1, 110), targets.reshape(-1), ignore_index=IGNORE
    )
    assert torch.allclose(formatted_lm_loss(logits, ids, lengths), flat)
    assert torch.allclose(formatted_lm_loss(logits, ids, lengths, combine="losses"), flat)


def test_similarity_lm_loss_averages_the_outputs_before_the_loss():
    # thesis Sec. 7.1.2: the LM heads' outputs of the two orders are averaged, then the loss.
    # Vocabulary {0, 1, 2}; one pair, both orders of length 3 (two next-token targets each).
    ids = torch.tensor([[[2, 0, 1], [2, 1, 0]]])  # targets: order 1 -> (0, 1), order 2 -> (1, 0)
    lengths = torch.tensor([[3, 3]])
    inf = float("inf")
    four, three = math.log(4.0), math.log(3.0)
    logits = torch.tensor([[
        [[0.0, 0.0, -inf], [four, 0.0, -inf], [0.0, 0.0, 0.0]],  # p: (.5, .5), (.8, .2)
        [[four, 0.0, -inf], [0.0, three, -inf], [0.0, 0.0, 0.0]],  # p: (.8, .2), (.25, .75)
    ]])
    # averaged outputs: position 0 -> (.65, .35), position 1 -> (.525, .475);
    # targets of the pair: position 0 -> {0, 1}, position 1 -> {1, 0}
    expected = -(
        (math.log(0.65) + math.log(0.35)) / 2 + (math.log(0.475) + math.log(0.525)) / 2
    ) / 2
    loss = formatted_lm_loss(logits, ids, lengths)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # swapping the two orders leaves it unchanged
    assert formatted_lm_loss(logits.flip(1), ids.flip(1), lengths).item() == pytest.approx(expected)
    # and it differs from the mean of the two orders' separate losses
    separate = -(
        (math.log(0.5) + math.log(0.2)) / 2 + (math.log(0.2) + math.log(0.25)) / 2
    ) / 2
    losses = formatted_lm_loss(logits, ids, lengths, combine="losses").item()
    assert losses == pytest.approx(separate, rel=1e-6) and abs(losses - expected) > 0.1


def test_similarity_lm_loss_masks_padding_and_rejects_unequal_views():
    torch.manual_seed(0)
    ids = torch.tensor([[[S, 1, D, 2, E], [S, 2, D, 1, E]], [[S, 3, E, 0, 0], [S, 3, E, 0, 0]]])
    lengths = torch.tensor([[5, 5], [3, 3]])
    logits = torch.randn(2, 2, 5, 110)
    # identical views: the averaged output is each view's own, so this is plain cross-entropy
    same = ids[:, :1].expand(-1, 2, -1)
    flat = torch.nn.functional.cross_entropy(
        logits[:, 0, :-1].reshape(-1, 110), lm_targets(ids[:, :1], lengths[:, :1]).reshape(-1),
        ignore_index=IGNORE,
    )
    both = logits[:, :1].expand(-1, 2, -1, -1)
    assert torch.allclose(formatted_lm_loss(both, same, lengths), flat)
    # padded positions do not count: changing their logits changes nothing
    moved = logits.clone()
    moved[1, :, 3:] += 5.0
    reference = formatted_lm_loss(logits, ids, lengths)
    assert torch.allclose(formatted_lm_loss(moved, ids, lengths), reference)
    with pytest.raises(ValueError, match="same length"):
        formatted_lm_loss(logits, ids, torch.tensor([[5, 4], [3, 3]]))
    with pytest.raises(ValueError, match="combine"):
        formatted_lm_loss(logits, ids, lengths, combine="mean")
