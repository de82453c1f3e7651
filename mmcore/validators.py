"""attrs validators whose messages survive into recipe errors (``key.path: message``).

They raise :class:`FieldError`, which carries the field name, so the recipe loader can
name the exact key path of a bad value.
"""


class FieldError(ValueError):
    """A bad value for one field; ``str(exc)`` is the message without the key path."""

    def __init__(self, field, message):
        self.field = field
        super().__init__(message)


def one_of(*choices):
    """The value must be one of ``choices``."""

    def check(instance, attribute, value):
        if value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise FieldError(attribute.name, f"must be one of {listed} (got {value!r})")

    return check


def at_least(minimum, *, allow=()):
    """The value must be >= ``minimum`` (or one of the special values in ``allow``)."""

    def check(instance, attribute, value):
        if value in allow or value is None:
            return
        if value < minimum:
            extra = f" or {', '.join(map(str, allow))}" if allow else ""
            raise FieldError(attribute.name, f"must be >= {minimum}{extra} (got {value!r})")

    return check


def in_range(low, high, *, high_inclusive=False):
    """``low <= value < high`` (``<= high`` when ``high_inclusive``)."""

    def check(instance, attribute, value):
        if value is None:
            return
        ok = low <= value <= high if high_inclusive else low <= value < high
        if not ok:
            bracket = "]" if high_inclusive else ")"
            raise FieldError(attribute.name, f"must be in [{low}, {high}{bracket} (got {value!r})")

    return check


def positive(instance, attribute, value):
    """The value must be > 0."""
    if value is not None and value <= 0:
        raise FieldError(attribute.name, f"must be > 0 (got {value!r})")


def at_most(maximum):
    """The value must be <= ``maximum`` (what its consumer accepts, e.g. a C int or a numpy seed)."""

    def check(instance, attribute, value):
        if value is not None and value > maximum:
            raise FieldError(attribute.name, f"must be <= {maximum} (got {value!r})")

    return check


def at_least_field(other):
    """The value must be >= the value of the field ``other`` (``max_n`` >= ``min_n``).

    attrs runs validators after every field is set, so the other field is there; the message
    names this field, so a recipe error reads ``text.params.max_n: must be >= min_n (4) (got 2)``.
    """

    def check(instance, attribute, value):
        bound = getattr(instance, other)
        if value is not None and bound is not None and value < bound:
            raise FieldError(attribute.name, f"must be >= {other} ({bound!r}) (got {value!r})")

    return check
