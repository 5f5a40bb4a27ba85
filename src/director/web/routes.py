"""The template of the Klein route that answered a request (``/playbooks/{playbook_id}/mcp``),
never the raw path, which holds ids and may hold anything a client typed: what the metrics
label requests by and what a trace's server span is named after (``http.route``)."""

from __future__ import annotations

import re
from typing import Any

from klein.interfaces import IKleinRequest

OTHER = "other"
_PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def route_template(request: Any, templates: dict[tuple[str, str], str]) -> str:
    """The template of the route that answered ``request``; ``other`` when none did.

    A resource that routes without Klein names its route in ``request.route``
    (``director.web.mcp_dispatch``). Else the innermost Klein app leaves its bound URL map on
    the request; matching it again (a few µs) names the rule without keeping anything from
    the raw path. ``templates`` caches each rule's template (the caller's: a service's own).
    """
    named: str | None = getattr(request, "route", None)
    if named is not None:
        return named
    mapper = getattr(IKleinRequest(request), "mapper", None)
    if mapper is None:
        return OTHER  # refused at the edge (Host, Origin, preflight) before any route
    try:
        rule, _ = mapper.match(return_rule=True)
    except Exception:  # NotFound, MethodNotAllowed, RequestRedirect
        return OTHER
    key = (mapper.script_name, rule.rule)
    template = templates.get(key)
    if template is None:
        template = templates[key] = _PARAMETER.sub(
            r"{\1}", mapper.script_name.rstrip("/") + rule.rule)
    return template
