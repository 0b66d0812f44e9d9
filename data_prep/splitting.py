"""Train/val/test assignment (scikit-learn's `train_test_split`, stratified by label when every
class allows it) and the seeded sample order within each split: same input, same result.
"""

from __future__ import annotations

import random
import sys

from infra.errors import UserError


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for flag, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise UserError("--val-fraction plus --test-fraction must leave samples for train (sum < 1)")


def stratified_splits(labels: list[int], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split name of each sample."""
    check_fractions(val_fraction, test_fraction)
    splits = ["train"] * len(labels)
    remaining = list(range(len(labels)))
    # Test first, then val as a fraction of what is left, so each is its fraction of the whole.
    for name, fraction in (("test", test_fraction), ("val", val_fraction / (1 - test_fraction))):
        if fraction == 0 or len(remaining) < 2:
            continue
        remaining, held_out = _split_off(remaining, [labels[i] for i in remaining], fraction, seed)
        for index in held_out:
            splits[index] = name
    return splits


def _split_off(indices: list[int], labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as error:  # a class with one sample, or fewer held-out samples than classes
        print(f"vitae: warning: split not stratified ({error})", file=sys.stderr)
    try:
        return train_test_split(indices, test_size=fraction, random_state=seed)
    except ValueError as error:
        raise UserError(f"cannot split {len(indices)} images by fraction {fraction:.3f}: {error}") from None


def shuffled(items: list, seed: int, split: str) -> list:
    """`items` in a seeded order, independent per split."""
    order = list(items)
    random.Random(f"{seed}/{split}").shuffle(order)
    return order
