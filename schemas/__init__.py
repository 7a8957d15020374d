"""The region-text schema (the one file format both halves of vesl share), validation and manifest."""

from vesl.schemas.region_text import (
    ERRORS_SCHEMA,
    REGION_TYPE,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    Violation,
    region_text_schema,
    schema_as_json,
)
from vesl.schemas.validation import validate

__all__ = [
    "ERRORS_SCHEMA",
    "REGION_TYPE",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_KEY",
    "Violation",
    "region_text_schema",
    "schema_as_json",
    "validate",
]
