"""What a check of ``director doctor`` reports."""

from __future__ import annotations

from typing import Any

import attrs

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@attrs.frozen
class Result:
    name: str
    status: str
    summary: str
    fix: str = ""
    details: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary,
                "fix": self.fix, "details": list(self.details)}
