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
