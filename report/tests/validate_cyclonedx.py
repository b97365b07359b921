"""Validates a CycloneDX 1.6 JSON document on stdin against the official schema (strict:
no properties the schema does not define). Exit status 0 when valid; prints why otherwise."""
import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(sys.stdin.read())
if error is not None:
    detail = getattr(error, "data", None)
    message = getattr(detail, "message", None) or str(error).splitlines()[0]
    path = "/".join(str(p) for p in getattr(detail, "absolute_path", []))
    print(f"invalid at /{path}: {message}")
    sys.exit(1)
print("valid CycloneDX 1.6")
