"""The pieces every part of the OpenAPI description repeats: references, answers, the security
schemes and the errors any authenticated operation may answer. A leaf module, so that routes
elsewhere (OAuth, the registry, YAML) describe their operations without importing the whole
document (which imports them)."""

from __future__ import annotations

from typing import Any

#: The credentials ``/api/v1`` accepts, by scheme name (``components.securitySchemes``).
SECURITY: list[dict[str, list[str]]] = [{"apiKeyHeader": []}, {"bearer": []},
                                        {"sessionCookie": []}]
#: Something besides white space (as Python's str.strip() sees it), and no NUL.
NON_BLANK = "^[^\u0000]*[^\\s\u0000\u001c-\u001f\u0085][^\u0000]*$"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_answer(description: str) -> dict[str, Any]:
    return json_answer(ref("Error"), description)


#: What any operation behind authentication may answer.
COMMON_ERRORS = {
    "401": error_answer("No credential, or a wrong, revoked or expired one"),
    "403": error_answer("Pending account (waitlist), or a cookie request failing the CSRF "
                        "check"),
    "429": error_answer("Rate limit of the API key or of the user exceeded (details.limit says "
                        "which; Retry-After)"),
    "503": error_answer("The database is unavailable"),
}
