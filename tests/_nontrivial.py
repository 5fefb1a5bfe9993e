"""Equivalence tests compare runs that learned something: a collapsed run (one code for every
query, mAP at chance) would match many wrong implementations just as well."""

from __future__ import annotations


def assert_learned(final: dict, encoders=("f", "fg"), min_codes: int = 10) -> None:
    """The run's test mAP is well above the chance level of its labels and its queries get at
    least `min_codes` distinct codes (digits: 10 classes, chance ~0.10)."""
    chance = final["chance_map"]
    floor = max(3 * chance, chance + 0.2)
    for enc in encoders:
        assert final[f"map_all_{enc}"] >= floor, (
            f"encoder {enc}: mAP {final[f'map_all_{enc}']:.3f} is near chance {chance:.3f}; "
            "the comparison would prove nothing")
        assert final[f"distinct_query_codes_{enc}"] >= min_codes, (
            f"encoder {enc}: only {final[f'distinct_query_codes_{enc}']} distinct query codes")
    assert "warnings" not in final, final["warnings"]


# Since the debug config learns, runs in different kinds of process (pytest's own, a spawned
# gloo worker, a Ray worker) are not always bit-identical: seen 2-37 of ~25,500 bits of B apart,
# with the same thread count, for a reason not found yet (not the thread count, the numba
# threading layer or a JIT compile; see the stop note). Same-kind comparisons stay exact.
BITS_APART = 0.01
MAP_APART = 0.02


def assert_same_run(B1, B2, final1: dict, final2: dict,
                    keys=("map_all_f", "map_all_g", "map_all_fg")) -> None:
    """Two runs of the same algorithm across process kinds: B within BITS_APART of its bits and
    mAP within MAP_APART (a wrong implementation lands far outside: a B with ~half its bits
    apart, or mAP at chance)."""
    assert B1.shape == B2.shape
    apart = float((B1 != B2).float().mean())
    assert apart <= BITS_APART, f"{apart:.4%} of B's bits apart"
    for key in keys:
        assert abs(final1[key] - final2[key]) <= MAP_APART, (key, final1[key], final2[key])
