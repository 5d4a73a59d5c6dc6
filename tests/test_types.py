"""Values at the input boundary: image references, digests and sizes.

References are normalised as docker does (``ubuntu`` is ``docker.io/library/ubuntu:latest``, served by
``registry-1.docker.io``); anything that cannot name an image is refused with
``InvalidReferenceError``, a ``BadInputError`` with exit code 2, before any path or URL is built.
"""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blobflow.config import EngineConfig, parse_size
from blobflow.errors import BadInputError, BlobflowError, InvalidDigestError, InvalidReferenceError
from blobflow.images import Platform
from blobflow.types import Digest, Reference

H64 = "0123456789abcdef" * 4
H128 = H64 * 2
SHA = f"sha256:{H64}"

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
hex128 = st.text(alphabet="0123456789abcdef", min_size=128, max_size=128)


# -- Reference.parse ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "endpoint"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io"),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None, "registry-1.docker.io"),
        ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io"),
        ("bitnami/redis:7", "docker.io", "bitnami/redis", "7", None, "registry-1.docker.io"),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io"),
        ("index.docker.io/library/ubuntu", "docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io"),
        ("registry-1.docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io"),
        (f"ubuntu@{SHA}", "docker.io", "library/ubuntu", None, SHA, "registry-1.docker.io"),
        (f"ubuntu:24.04@{SHA}", "docker.io", "library/ubuntu", "24.04", SHA, "registry-1.docker.io"),
        ("localhost:5000/a", "localhost:5000", "a", "latest", None, "localhost:5000"),
        ("localhost/a", "localhost", "a", "latest", None, "localhost"),
        (f"127.0.0.1:5000/a/b:t@{SHA}", "127.0.0.1:5000", "a/b", "t", SHA, "127.0.0.1:5000"),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, "[::1]:5000"),
        ("ghcr.io/org/app:1.0", "ghcr.io", "org/app", "1.0", None, "ghcr.io"),
        ("registry.example.com:443/a__b/c--d/e.f_g:V1.2-rc_3", "registry.example.com:443", "a__b/c--d/e.f_g",
         "V1.2-rc_3", None, "registry.example.com:443"),
        # docker's own quirk: without a '/', "localhost:5000" is the image library/localhost, tag 5000
        ("localhost:5000", "docker.io", "library/localhost", "5000", None, "registry-1.docker.io"),
    ],
)
def test_reference_normalised_like_docker(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, endpoint: str
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (str(ref.digest) if ref.digest else None) == digest
    assert ref.endpoint == endpoint
    # the canonical form parses back to the same reference
    assert Reference.parse(str(ref)) == ref


def test_reference_default_tag_and_manifest_reference() -> None:
    assert Reference.parse("ubuntu", default_tag=None).tag is None
    assert Reference.parse("ubuntu").reference == "latest"
    pinned = Reference.parse(f"ubuntu:22.04@{SHA}")
    assert pinned.reference == SHA  # a digest wins over the tag for /manifests/<reference>


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("localhost:5000/a", True),
        ("localhost/a", True),
        ("127.0.0.1:5000/a", True),
        ("127.3.2.1/a", True),
        ("[::1]:5000/x", True),
        ("[::1]/x", True),
        ("[::2]:5000/x", False),
        ("10.0.0.1:5000/x", False),
        ("0.0.0.0:5000/x", False),
        ("ghcr.io/a/b", False),
        ("ubuntu", False),
        ("localhost.example.com/a", False),
    ],
)
def test_reference_is_loopback(text: str, loopback: bool) -> None:
    assert Reference.parse(text).is_loopback is loopback


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "ubuntu latest",
        "ubuntu\n",
        "Ubuntu",  # repository components are lowercase
        "library/Ubuntu",
        "localhost:5000/A",
        "a:b:c",
        "ubuntu:",
        "ubuntu:-x",  # a tag starts with a word character
        "ubuntu:" + "t" * 129,  # tags are at most 128 characters
        "a___b",
        "a/b/",
        "foo//bar",
        "/ubuntu",
        "a-/b",
        "localhost:5000/",
        "[::1]:5000",  # a registry without a repository
        "example.com:99999/a",
        "host:0/x",
        "host.com:abc/x",
        "-bad.com/a",
        "my_host.com/x",
        "[zz]:5000/x",
        "[::1/x",
        "[::1]x/y",
        "ubuntu@",
        "ubuntu@sha256:abc",
        f"ubuntu@sha256:{H64.upper()}",
        f"ubuntu@md5:{H64}",
        f"ubuntu@{SHA}@{SHA}",
    ],
)
def test_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        Reference.parse(text)
    assert isinstance(info.value, BadInputError)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["localhost:/x", "example.com:/x", "[::1]:/x"])
def test_reference_rejects_empty_port(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        Reference.parse(text)


def test_reference_rejects_name_over_255_characters() -> None:
    with pytest.raises(InvalidReferenceError):
        Reference.parse("example.com/" + "a" * 250)


def test_a_password_in_a_reference_is_not_said_back() -> None:
    """`user:password@host/repo`, as in a URL, was "unsupported digest algorithm" for the host,
    quoting the whole string, password included."""
    with pytest.raises(InvalidReferenceError) as info:
        Reference.parse("alice:S3cr3tPassw0rd@127.0.0.1:5201/app")
    assert "S3cr3t" not in str(info.value) and "alice" not in str(info.value)
    assert "blobflow login" in str(info.value)


def test_a_reference_object_is_taken_as_itself_and_other_types_are_bad_input() -> None:
    ref = Reference.parse("127.0.0.1:5000/a/b@" + SHA)
    assert Reference.parse(ref) == ref
    assert Reference.parse(Reference.parse("127.0.0.1:5000/a/b", default_tag=None), default_tag=None).tag is None
    for bad in (None, 5, b"127.0.0.1:5000/a"):
        with pytest.raises(InvalidReferenceError, match="an image reference is a string"):
            Reference.parse(bad)  # type: ignore[arg-type]


_REF_ALPHABET = string.ascii_letters + string.digits + ".:/@-_[]% \t\n\x00é"


@given(st.text(alphabet=st.sampled_from(_REF_ALPHABET), max_size=80) | st.text(max_size=80))
@example(f"127.0.0.1:5000/a/b:t@{SHA}")
@example("[")
@example("[]/x")
@example("@")
def test_reference_parse_raises_only_invalid_reference(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReferenceError:
        return
    # whatever is accepted is canonical: it prints and parses back to itself
    assert Reference.parse(str(ref)) == ref


# -- Digest.parse --------------------------------------------------------------------------------

@given(hex64)
def test_sha256_digest_round_trips(hexpart: str) -> None:
    d = Digest.parse(f"sha256:{hexpart}")
    assert (d.algorithm, d.hex) == ("sha256", hexpart)
    assert str(d) == f"sha256:{hexpart}"
    assert Digest.parse(str(d)) == d


@given(hex128)
def test_sha512_digest_round_trips(hexpart: str) -> None:
    d = Digest.parse(f"sha512:{hexpart}")
    assert str(d) == f"sha512:{hexpart}"
    assert Digest.parse(str(d)) == d


def test_digest_of_bytes() -> None:
    assert Digest.of(b"hello") == Digest.parse("sha256:" + hashlib.sha256(b"hello").hexdigest())


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        H64,  # no algorithm
        f"sha256:{H64[:-1]}",
        f"sha256:{H64}0",
        f"sha256:{H64.upper()}",
        f"SHA256:{H64}",
        f"sha256:{H64[:-1]}g",
        f"sha256: {H64[1:]}",
        f"sha256:{H64}\n",
        f"sha512:{H64}",  # sha512 needs 128 digits
        f"sha256:{H128}",
        f"sha384:{'0' * 96}",
        f"md5:{'0' * 32}",
        f"sha256:{H64[:-1]}٣",  # a non-ASCII digit
        f"sha256:sha256:{H64}",
    ],
)
def test_digest_rejects(text: str) -> None:
    with pytest.raises(InvalidDigestError) as info:
        Digest.parse(text)
    assert isinstance(info.value, BadInputError)
    assert info.value.exit_code == 2


@given(
    st.text()
    | st.builds(lambda a, h: f"{a}:{h}", st.sampled_from(["sha256", "sha512", "SHA256", "sha1", ""]),
                st.text(alphabet="0123456789abcdefABCDEF:g ", max_size=130))
)
def test_digest_parse_raises_only_invalid_digest(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigestError:
        return
    # accepted: exactly the canonical text
    assert str(d) == text
    assert len(d.hex) == {"sha256": 64, "sha512": 128}[d.algorithm]
    assert set(d.hex) <= set("0123456789abcdef")


# -- parse_size ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0", 0),
        ("10GB", 10_000_000_000),
        ("10gb", 10_000_000_000),
        ("10 GB", 10_000_000_000),
        ("512MiB", 536_870_912),
        ("512mib", 536_870_912),
        ("1KiB", 1024),
        ("1k", 1000),
        ("1.5MB", 1_500_000),
        ("2GiB", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("1tb", 10**12),
        ("4096b", 4096),
        (" 7 ", 7),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", " ", "GB", "10XB", "10 G B", "-1", "1e3", "1,000", "0x10", "1.", ".5MB",
                                  "10GBs", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_size(text)
    assert info.value.exit_code == 2


def test_parse_size_huge_number_is_bad_input() -> None:
    with pytest.raises(BadInputError):
        parse_size("1" * 400)


def test_parse_size_exact_for_plain_integers() -> None:
    assert parse_size("9007199254740993") == 9007199254740993


@given(st.integers(min_value=0, max_value=2**53))
def test_parse_size_plain_integer_round_trips(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


@given(st.text(max_size=40) | st.from_regex(r"\s*[0-9]{1,20}(\.[0-9]{1,5})?\s*[kmgtKMGTiIbB]{0,3}\s*", fullmatch=True))
def test_parse_size_raises_only_bad_input(text: str) -> None:
    try:
        size = parse_size(text)
    except BadInputError:
        return
    assert isinstance(size, int) and size >= 0


@pytest.mark.parametrize(("name", "value"), [
    ("concurrency", 1.5), ("concurrency", True), ("part_size", 0), ("retries", -1), ("max_layer_size", -1),
    ("max_layer_size", "10GB"), ("chunk_size", 0), ("read_timeout", -5), ("read_timeout", 0),
    ("connect_timeout", float("nan")), ("backoff_cap", float("inf")), ("backoff_base", -1), ("state_dir", 123),
])
def test_engine_config_refuses_values_that_mean_nothing(name: str, value: object) -> None:
    """The CLI's flags are checked as they are parsed; the API's EngineConfig was not: concurrency
    1.5 broke the scheduler mid-job, a negative read timeout timed out every request, "10GB" as a
    size was a TypeError at the first upload."""
    with pytest.raises(BadInputError, match=name.replace("_", "-")):
        EngineConfig(**{name: value})  # type: ignore[arg-type]


def test_engine_config_takes_what_means_something() -> None:
    EngineConfig(concurrency=1, retries=0, backoff_base=0, read_timeout=0.5, max_layer_size=10 ** 10,
                 chunk_size=None, state_dir="/tmp/x", socket_buffer=0, monolithic_threshold=0)


def test_errors_are_blobflow_errors() -> None:
    for cls in (InvalidReferenceError, InvalidDigestError):
        assert issubclass(cls, BadInputError) and issubclass(cls, BlobflowError) and issubclass(cls, ValueError)


@pytest.mark.parametrize(("asked", "entry", "match"), [
    ("linux/arm64/v8", {"os": "linux", "architecture": "arm64"}, True),  # docker reports arm64/v8
    ("linux/arm64", {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
    ("linux/arm64/v8", {"os": "linux", "architecture": "aarch64"}, True),
    ("linux/arm/v7", {"os": "linux", "architecture": "arm"}, True),
    ("linux/amd64", {"os": "linux", "architecture": "x86_64"}, True),
    ("linux/arm/v6", {"os": "linux", "architecture": "arm", "variant": "v7"}, False),
    ("linux/arm64/v8", {"os": "linux", "architecture": "arm64", "variant": "v9"}, False),
    ("linux/arm64", {"os": "windows", "architecture": "arm64"}, False),
    ("linux/amd64", None, False),
])
def test_a_platform_matches_as_docker_matches_it(asked: str, entry: dict[str, str] | None, match: bool) -> None:
    """`--platform linux/arm64/v8` (what docker reports for arm64 hosts) found no image in an index
    whose arm64 entry names no variant."""
    assert Platform.parse(asked).matches(entry) is match
