"""Entropy pseudo-labels: uncertainty scalings, histogram medians (correct and reference), relabelling (docs/methods.md §3.9)."""

from __future__ import annotations

import math

import pytest
import torch

from sats.losses import (
    ThresholdAccumulator,
    entropy_pseudo_labels,
    normalized_entropy,
    reference_uncertainty,
)

IGN = 255

# ------------------------------------------------------------------------------------- uncertainty


def test_uncertainty_hand_values():
    uniform = torch.zeros(1, 3, 1, 1)  # q = (1/3, 1/3, 1/3)
    confident = torch.tensor([30.0, 0.0, 0.0]).view(1, 3, 1, 1)
    # reference: −(1/log 3)·(1/3)·Σ_c (1/3) log(1/3) = 1/3, then / log K_t (K_t = 4)
    assert reference_uncertainty(uniform, 4).item() == pytest.approx(1 / (3 * math.log(4)), rel=1e-6)
    assert normalized_entropy(uniform).item() == pytest.approx(1.0, rel=1e-6)
    assert reference_uncertainty(confident, 4).abs().item() < 1e-6
    assert normalized_entropy(confident).item() == pytest.approx(0.0, abs=1e-6)


def test_uncertainty_match_loop_and_scaling():
    logits = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(0)) * 3
    k_old, k_now = 4, 6
    ref, correct = reference_uncertainty(logits, k_now), normalized_entropy(logits)
    assert ref.shape == correct.shape == (2, 2, 3)
    for i in range(2):
        for y in range(2):
            for x in range(3):
                z = [float(v) for v in logits[i, :, y, x]]
                m = max(z)
                total = sum(math.exp(v - m) for v in z)
                q = [math.exp(v - m) / total for v in z]
                expected_ref = -sum(p * math.log(p + 1e-8) for p in q) / k_old / math.log(k_old) / math.log(k_now)
                expected_correct = -sum(p * math.log(p) for p in q) / math.log(k_old)
                assert ref[i, y, x].item() == pytest.approx(expected_ref, rel=1e-5, abs=1e-9)
                assert correct[i, y, x].item() == pytest.approx(expected_correct, rel=1e-5, abs=1e-7)
    # the reference value is the normalised entropy divided by K_old · log K_t (up to the 1e-8 epsilons)
    torch.testing.assert_close(ref, correct / (k_old * math.log(k_now)), rtol=1e-4, atol=1e-7)
    assert float(correct.max()) <= 1.0 + 1e-6 and float(ref.max()) <= 1 / (k_old * math.log(k_now)) + 1e-6


def test_uncertainty_errors_and_bf16():
    with pytest.raises(ValueError, match="at least 2 old channels"):
        normalized_entropy(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="num_classes_now=2"):
        reference_uncertainty(torch.zeros(1, 3, 2, 2), 2)
    logits = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(1)) * 40
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for u in (reference_uncertainty(logits.bfloat16(), 7), normalized_entropy(logits.bfloat16())):
            assert u.dtype == torch.float32 and torch.isfinite(u).all()


# ------------------------------------------------------------------------------------------ histogram


def test_update_builds_histogram_like_a_loop():
    uncertainty = torch.tensor([[[0.05, 0.15, 0.99], [1.0, 7.0, 0.15]], [[0.0, 0.25, 0.31], [0.15, 0.5, 0.05]]])
    predicted = torch.tensor([[[0, 1, 2], [2, 2, 1]], [[0, 0, 1], [1, 2, 0]]])
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1, 1, 1] = False  # not counted
    acc = ThresholdAccumulator(3, bins=10)
    acc.update(uncertainty, predicted, mask)
    acc.update(uncertainty[:1], predicted[:1], mask[:1])  # counts add up
    expected = torch.zeros(3, 10, dtype=torch.int64)
    for rep in (2, 1):
        for i in range(rep):
            for y in range(2):
                for x in range(3):
                    if mask[i, y, x]:
                        expected[int(predicted[i, y, x]), min(int(float(uncertainty[i, y, x]) * 10), 9)] += 1
    assert torch.equal(acc.histogram, expected)
    assert int(acc.histogram[2, 9]) == 6  # image 0 (counted twice): 0.99, 1.0 and 7.0 (clamped into the last bin)
    assert int(acc.histogram.sum()) == 11 + 6


def test_update_rejects_bad_inputs():
    acc = ThresholdAccumulator(2, bins=10)
    ones = torch.ones(1, 1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        acc.update(torch.zeros(1, 1, 2), torch.tensor([[[0, 2]]]), ones)
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(torch.tensor([[[0.1, float("nan")]]]), torch.zeros(1, 1, 2, dtype=torch.long), ones)
    with pytest.raises(ValueError, match="shapes differ"):
        acc.update(torch.zeros(1, 1, 2), torch.zeros(1, 2, dtype=torch.long), ones)
    # an out-of-range class under a False mask is fine: it is not counted
    acc.update(torch.zeros(1, 1, 2), torch.tensor([[[0, 5]]]), torch.tensor([[[True, False]]]))
    assert int(acc.histogram.sum()) == 1
    with pytest.raises(ValueError, match="mode"):
        ThresholdAccumulator(2, mode="median")


def _with_counts(counts: dict, num_classes: int, bins: int, mode: str) -> ThresholdAccumulator:
    acc = ThresholdAccumulator(num_classes, bins=bins, mode=mode)
    for (c, b), n in counts.items():
        acc.histogram[c, b] = n
    return acc


def test_correct_median_on_known_histograms():
    counts = {
        (0, 1): 1, (0, 2): 2, (0, 3): 4, (0, 4): 3,  # total 10, half 5: cumulative 1, 3, 7 → bin 3, (3 + 2/4)/10
        (1, 0): 1000,  # all in bin 0: (0 + 500/1000)/10 = 0.05
        # class 2 never predicted
        (3, 0): 1,  # median (0 + 0.5/1)/10 = 0.05
    }
    thresholds = _with_counts(counts, 4, 10, "correct").thresholds(floor=0.001)
    torch.testing.assert_close(thresholds, torch.tensor([0.35, 0.05, 0.001, 0.05]))
    # the floor wins over a smaller median
    assert _with_counts(counts, 4, 10, "correct").thresholds(floor=0.2).tolist() == pytest.approx([0.35, 0.2, 0.2, 0.2])


def test_correct_median_close_to_the_data_median():
    values = torch.rand(1, 1, 4001, generator=torch.Generator().manual_seed(3)) ** 2  # skewed towards 0
    acc = ThresholdAccumulator(1, bins=100)
    acc.update(values, torch.zeros_like(values, dtype=torch.long), torch.ones_like(values, dtype=torch.bool))
    assert acc.thresholds().item() == pytest.approx(values.median().item(), abs=0.01)


def test_reference_median_reproduces_the_bin_index_bug():
    bins = 100
    counts = {
        # class 0: 2, 2, 2, 6 in bins 0..3: total 12, half 6.
        #   correct: cumulative 2, 4, 6 → bin 2, (2 + (6 − 4)/2)/100 = 0.03
        #   reference: running sum before bin i is 0+1+…+(i−1): 0, 0, 1, 3 → stops at bin 3 (3 ≤ 6 ≤ 3 + 6),
        #   median = 0.03 + (6 − 3)/6 · 0.01 = 0.035
        (0, 0): 2, (0, 1): 2, (0, 2): 2, (0, 3): 6,
        # class 1: 200 values in bin 50, half 100. Reference: no bin stops the walk, it ends at the last
        #   bin with running sum 4950 and an empty bin: 0.99 + (100 − 4950)/0 · 0.01 = −inf → floor 0.001.
        #   correct: (50 + 100/200)/100 = 0.505
        (1, 50): 200,
        # class 2: bin 0 holds the majority: both give (0 + 6/10)/100 = 0.006
        (2, 0): 10, (2, 1): 2,
    }
    # class 3: 110 in each of bins 0..98 (total 10890, half 5445 > 4950): the walk never stops and
    #   ends on the empty last bin: +inf → replaced by 0.005. correct: (49 + (5445 − 5390)/110)/100 = 0.495
    counts.update({(3, b): 110 for b in range(99)})
    reference = _with_counts(counts, 5, bins, "reference").thresholds(floor=0.001)
    correct = _with_counts(counts, 5, bins, "correct").thresholds(floor=0.001)
    torch.testing.assert_close(reference, torch.tensor([0.035, 0.001, 0.006, 0.005, 0.001]))
    torch.testing.assert_close(correct, torch.tensor([0.03, 0.505, 0.006, 0.495, 0.001]))


def _reference_loop_median(hist: list, bins: int) -> float:
    """The reference's loop, transcribed for the test (running sum adds the bin index)."""
    total = sum(hist)
    half = total / 2
    running = 0.0
    for index in range(bins):
        lower = index / bins
        if half >= running and half <= running + hist[index]:
            break
        running += index
    with torch.no_grad():
        return float(torch.tensor(lower, dtype=torch.float64) + (half - running) / torch.tensor(float(hist[index]), dtype=torch.float64) / bins)


def test_reference_mode_matches_loop_on_random_histograms():
    gen = torch.Generator().manual_seed(4)
    bins = 20
    acc = ThresholdAccumulator(6, bins=bins, mode="reference")
    acc.histogram.copy_(torch.randint(0, 30, (6, bins), generator=gen) * (torch.rand(6, bins, generator=gen) < 0.4))
    got = acc.thresholds(floor=0.0)
    for c in range(6):
        hist = acc.histogram[c].tolist()
        if sum(hist) == 0:
            assert got[c].item() == 0.0
            continue
        expected = _reference_loop_median(hist, bins)
        expected = 0.005 if expected == math.inf else max(expected, 0.0)
        assert got[c].item() == pytest.approx(expected, rel=1e-6, abs=1e-9), (c, hist)


# --------------------------------------------------------------------------------------- relabelling


def _hand_case():
    labels = torch.tensor([[[0, 0], [3, IGN]], [[0, 0], [0, 4]]])
    # old arg-max per pixel (3 old channels)
    argmax = torch.tensor([[[1, 2], [0, 1]], [[0, 1], [2, 2]]])
    old_logits = torch.nn.functional.one_hot(argmax, 3).permute(0, 3, 1, 2).float() * 5
    uncertainty = torch.tensor([[[0.05, 0.4], [0.0, 0.0]], [[0.2, 0.1], [0.29, 0.0]]])
    thresholds = torch.tensor([0.5, 0.1, 0.3])
    return labels, old_logits, uncertainty, thresholds


def test_pseudo_labels_hand_case():
    labels, old_logits, uncertainty, thresholds = _hand_case()
    pseudo, factor = entropy_pseudo_labels(labels, old_logits, thresholds, uncertainty, num_old=3)
    expected = torch.tensor(
        [
            [[1, IGN], [3, IGN]],  # confident old class 1 / uncertain → 255 / current label kept / 255 kept
            [[0, IGN], [2, 4]],  # confident background / u = τ is not < τ → 255 / old class 2 / current kept
        ]
    )
    assert torch.equal(pseudo, expected)
    assert factor.shape == (2, 1, 1)
    torch.testing.assert_close(factor.flatten(), torch.tensor([1 / (2 + 1e-6), 2 / (3 + 1e-6)]))
    assert torch.equal(labels, torch.tensor([[[0, 0], [3, IGN]], [[0, 0], [0, 4]]]))  # input untouched


def test_pseudo_labels_old_ground_truth_of_memory_images():
    labels, old_logits, uncertainty, thresholds = _hand_case()
    labels = labels.clone()
    labels[1, 0, 1] = 2  # old-class ground truth (memory image); the old model predicts 1, uncertain
    overwritten, factor = entropy_pseudo_labels(labels, old_logits, thresholds, uncertainty, 3)
    assert overwritten[1, 0, 1].item() == IGN  # the reference overwrites it (labels < num_old)
    kept, factor_kept = entropy_pseudo_labels(labels, old_logits, thresholds, uncertainty, 3, keep_old_labels=True)
    assert kept[1, 0, 1].item() == 2
    assert factor[1].item() == pytest.approx(2 / 3, rel=1e-5) and factor_kept[1].item() == pytest.approx(1.0, rel=1e-5)


def test_pseudo_labels_no_background_gives_zero_factor_and_errors():
    labels, old_logits, uncertainty, thresholds = _hand_case()
    _, factor = entropy_pseudo_labels(torch.full_like(labels, 4), old_logits, thresholds, uncertainty, 3)
    assert factor.flatten().tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="num_old=4"):
        entropy_pseudo_labels(labels, old_logits, thresholds, uncertainty, 4)
    with pytest.raises(ValueError, match="thresholds"):
        entropy_pseudo_labels(labels, old_logits, thresholds[:2], uncertainty, 3)
