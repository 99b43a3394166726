"""Rule tables: small functions keyed by op type, the way passes with one rule per op are written."""

from __future__ import annotations

from collections.abc import Callable


class RuleTable(dict):
    """Op type -> rule function; `@table.rule("Add", "Sub")` registers one function for those ops."""

    def rule(self, *op_types: str) -> Callable[[Callable], Callable]:
        def register(function: Callable) -> Callable:
            for op_type in op_types:
                self[op_type] = function
            return function

        return register
