"""The public API: what __init__ exports follows its stated rule."""

import florence_helpers


def test_all_is_sorted_constants_classes_functions_and_importable():
    names = florence_helpers.__all__
    kinds = [0 if n.isupper() else 1 if n[0].isupper() else 2 for n in names]
    assert list(zip(kinds, names, strict=True)) == sorted(zip(kinds, names, strict=True))
    assert all(hasattr(florence_helpers, name) for name in names)
    assert len(set(names)) == len(names)
