"""GHCR's documented rules, checked before any byte is sent."""

from __future__ import annotations

import pytest

from blobflow.config import GB, KNOWN_LIMITS, EngineConfig, MiB
from blobflow.errors import BadInputError, LimitExceededError
from blobflow.images import GHCR_DESCRIPTION_MAX, GHCR_LICENSES_MAX, check_annotations, preflight_sizes
from blobflow.types import Descriptor, Digest, Reference

GHCR = Reference.parse("ghcr.io/org/app:1")
ELSEWHERE = Reference.parse("registry.example.com/org/app:1")
DESC = "org.opencontainers.image.description"
LIC = "org.opencontainers.image.licenses"


@pytest.mark.parametrize(("key", "limit"), [(DESC, GHCR_DESCRIPTION_MAX), (LIC, GHCR_LICENSES_MAX)])
def test_ghcr_length_limits(key: str, limit: int) -> None:
    assert (GHCR_DESCRIPTION_MAX, GHCR_LICENSES_MAX) == (512, 256)
    check_annotations(GHCR, {key: "x" * limit})  # at the limit: fine
    with pytest.raises(BadInputError, match=f"at most {limit} characters"):
        check_annotations(GHCR, {key: "x" * (limit + 1)})
    check_annotations(ELSEWHERE, {key: "x" * (limit + 1)})  # other registries have no such rule
    check_annotations(GHCR, None)


def test_ghcr_layer_size_limit_refuses_before_sending() -> None:
    assert KNOWN_LIMITS["ghcr.io"].max_layer_size == 10 * GB
    assert KNOWN_LIMITS["ghcr.io"].upload_window == 600
    assert KNOWN_LIMITS["ghcr.io"].max_chunk == 4 * MiB
    digest = Digest("sha256", "a" * 64)
    preflight_sizes(EngineConfig(), "ghcr.io", [Descriptor("x", digest, 10 * GB)])
    with pytest.raises(LimitExceededError, match=r"over ghcr\.io's limit") as info:
        preflight_sizes(EngineConfig(), "ghcr.io", [Descriptor("x", digest, 10 * GB + 1)])
    assert info.value.exit_code == 2
    preflight_sizes(EngineConfig(), "registry.example.com", [Descriptor("x", digest, 10 * GB + 1)])
