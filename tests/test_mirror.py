"""Mirror plans: many tags across repositories, politely, resumably, and sharded."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeProxy, sigint_as_at_a_terminal
from faultproxy import BLOB_PATH, Faults

import blobflow
from blobflow.errors import BadInputError
from blobflow.localreg import LocalRegistry
from blobflow.mirror import MirrorEntry, load_plan, parse_plan, parse_shard, select_tags, shard_of
from blobflow.synth import build_image
from blobflow.types import Reference

KiB = 1024
REPOS = 8
TAGS = 5  # 8 repositories x 5 tags = 40 images


def _entry(**kw: object) -> MirrorEntry:
    return MirrorEntry(Reference.parse("r.example/a", default_tag=None), Reference.parse("m.example/a",
                                                                                       default_tag=None), **kw)  # type: ignore[arg-type]


def test_select_tags_filters_then_keeps_the_newest_by_version_order() -> None:
    tags = ["1.9", "1.10", "1.2", "latest", "1.10-rc1", "2.0", "1.11"]
    entry = _entry(include=(re.compile(r"^\d+\.\d+"),), exclude=(re.compile("-rc"),), newest=3)
    assert select_tags(tags, entry) == ["1.10", "1.11", "2.0"]
    assert select_tags(tags, _entry(tags=("x", "y"))) == ["x", "y"]
    assert select_tags(tags, _entry()) == ["latest", "1.2", "1.9", "1.10-rc1", "1.10", "1.11", "2.0"]


@pytest.mark.parametrize(("tags", "newest"), [
    # a release is newer than its pre-releases (was: 1.10.0-rc1 picked over 1.10.0, 1.22rc1 over 1.22.1)
    (["1.9.9", "1.10.0", "1.10.0-rc1", "1.10.0-beta.2", "1.10.0-rc.2"], ["1.10.0-rc1", "1.10.0-rc.2", "1.10.0"]),
    (["1.21.5", "1.22rc1", "1.22.0", "1.22.1"], ["1.22rc1", "1.22.0", "1.22.1"]),
    # a variant is newer than the plain tag and older than the next version
    (["3.20.1", "3.20-alpine", "3.20", "3.9"], ["3.20", "3.20-alpine", "3.20.1"]),
    # a leading v is no text (was: every v-tag newer than any plain one)
    (["v1.10.0", "1.9.0", "v2.0.0", "1.11.0"], ["v1.10.0", "1.11.0", "v2.0.0"]),
    # names are no versions: newest picks versions while there are (was: latest and bookworm the newest)
    (["latest", "bookworm", "12.5", "12.6", "11.9"], ["11.9", "12.5", "12.6"]),
    (["latest", "stable", "1.0"], ["latest", "stable", "1.0"]),
    # 2.0 is the 2.0.0 release (was: 2.0.0-beta1 and 1.10.0-rc1 picked over 2.0 and 1.10)
    (["1.9", "2.0", "2.0.0-beta1", "1.10.0-rc1", "1.10"], ["1.10", "2.0.0-beta1", "2.0"]),
])
def test_newest_by_version_order(tags: list[str], newest: list[str]) -> None:
    assert select_tags(tags, _entry(newest=3)) == newest


def test_shards_partition_the_plan_deterministically() -> None:
    names = [f"r.example/repo{i}:{t}" for i in range(30) for t in range(4)]
    owners = [shard_of(n, 3) for n in names]
    assert owners == [shard_of(n, 3) for n in names]  # stable
    assert set(owners) == {0, 1, 2}  # every shard gets work
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1", "-1/2", "0/0"):
        with pytest.raises(BadInputError):
            parse_shard(bad)


async def test_the_api_refuses_a_shard_no_image_is_in() -> None:
    """(2, 2) from a 1-based index mirrored nothing and said it succeeded; (0, 0) divided by zero."""
    plan = parse_plan({"mirror": [{"source": "127.0.0.1:9/a", "destination": "127.0.0.1:9/b"}]})
    for bad in ((2, 2), (5, 2), (-1, 2), (0, 0), (0.0, 2), [0, 2]):
        with pytest.raises(BadInputError, match="invalid shard"):
            await blobflow.Client().mirror(plan, shard=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("plan", "message"), [
    ({}, "no \\[\\[mirror\\]\\]"),
    ({"mirror": [{"source": "a"}]}, "lacks 'destination'"),
    ({"mirror": [{"source": "a", "destination": "b", "newest": 0}]}, "newest"),
    ({"mirror": [{"source": "a", "destination": "b", "include": "("}]}, "invalid regex"),
    ({"mirror": [{"source": "a", "destination": "b", "colour": "red"}]}, "unknown key"),
    ({"defaults": {"platform": ["linux/amd64"], "rates": 2}, "mirror": [{"source": "a", "destination": "b"}]},
     "\\[defaults\\]: unknown key\\(s\\) platform, rates"),
    # filters that were ignored beside the tags they select from
    ({"mirror": [{"source": "a", "destination": "b", "tags": ["1.10", "latest"], "newest": 1,
                  "include": ["^nomatch$"]}]}, "include, newest select among a repository's tags"),
    ({"mirror": [{"source": "a:latest", "destination": "b", "exclude": ["latest"]}]}, "exclude select among"),
    ({"mirror": [{"source": "a", "destination": "b", "newest": True}]}, "newest must be a whole number"),
    # two sources into one destination: the tag flipped between them at every run
    ({"mirror": [{"source": "a", "destination": "b"}, {"source": "c", "destination": "b"}]},
     "entries 1 and 2 both write docker.io/library/b"),
    ({"mirror": [{"source": "a", "destination": "b", "tags": ["1", "2"]},
                 {"source": "c", "destination": "b", "tags": ["2", "3"]}]},
     "entries 1 and 2 both write .* \\(tags 2\\)"),
    ({"mirror": [{"source": "a:1", "destination": "b", "tags": ["2"]}]}, "not both"),
    ({"mirror": [{"source": "a", "destination": "b", "platforms": ["linux"]}]}, "platforms"),
    ({"mirror": [{"source": "UPPER", "destination": "b"}]}, "invalid reference"),
    *(({"defaults": {"rate": bad}, "mirror": [{"source": "a", "destination": "b"}]}, "defaults.rate")
      for bad in (-1, float("nan"), float("inf"), True, "5")),
])
def test_bad_plans_are_bad_input(plan: dict[str, object], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        parse_plan(plan)


def test_entries_may_share_a_destination_repository_with_tags_of_their_own() -> None:
    plan = parse_plan({"mirror": [{"source": "a", "destination": "b", "tags": ["1"]},
                                  {"source": "c", "destination": "b", "tags": ["2"]}]})
    assert [e.tags for e in plan.entries] == [("1",), ("2",)]


async def test_a_rate_that_is_no_rate_is_bad_input(tmp_path: Path) -> None:
    """--rate -1, nan and inf were taken (the gate read them as no limit); 0 is no limit, as in
    a plan. Refused before anything is asked of a registry (there is none here)."""
    plan = tmp_path / "plan.toml"
    plan.write_text('[[mirror]]\nsource = "127.0.0.1:9/a"\ndestination = "127.0.0.1:9/b"\n')
    for bad in ("-1", "nan", "inf", "fast"):
        code, _, err = await _mirror(plan, "--rate", bad)
        assert code == 2 and "invalid rate" in err, (bad, err)
    with pytest.raises(BadInputError, match="rate must be a positive number"):
        blobflow.EngineConfig(rate=-1.0)


def test_a_plan_file_that_is_not_toml_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "plan.toml").write_text("[[mirror]\nsource = ")
    with pytest.raises(BadInputError, match="not valid TOML"):
        load_plan(tmp_path / "plan.toml")
    with pytest.raises(BadInputError, match="does not exist"):
        load_plan(tmp_path / "nope.toml")
    with pytest.raises(BadInputError, match=r"cannot read plan .*: Is a directory$"):  # no "[Errno 21]"
        load_plan(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(BadInputError, match="is not UTF-8 text"):
        load_plan(tmp_path / "latin1.toml")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 repositories of 5 tags as layouts; every image shares one base layer."""
    root = tmp_path_factory.mktemp("mirror-images")
    for r in range(REPOS):
        for t in range(TAGS):
            build_image(root / f"{r}-{t}", f"1.{t}", [16 * KiB], seed=r * 100 + t, base_layers=[256 * KiB],
                        base_seed=1)
    return root


async def _populate(registry: LocalRegistry, layouts: Path, tmp_path: Path) -> dict[str, str]:
    """Push the 40 images to ``registry``; returns image -> manifest digest."""
    client = blobflow.Client(blobflow.EngineConfig(plain_http=True, state_dir=str(tmp_path / "state")))

    async def push_repo(r: int) -> dict[str, str]:
        # one repository's tags one after another: Distribution 2.8 races when separate clients
        # commit the same blob into one repository at once (a half-written link file makes a
        # concurrent manifest PUT fail with DIGEST_INVALID); within one blobflow job the
        # scheduler's single flight never does that
        out = {}
        for t in range(TAGS):
            result = await client.push(layouts / f"{r}-{t}", f"{registry.host}/lib/app{r}:1.{t}")
            out[f"lib/app{r}:1.{t}"] = result.images[0].digest
        return out

    digests: dict[str, str] = {}
    for part in await asyncio.gather(*(push_repo(r) for r in range(REPOS))):
        digests.update(part)
    return digests


def _base_layer(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    return str(manifest["layers"][0]["digest"])


def _plan(path: Path, src: str, dst: str, *, broken: bool = False) -> Path:
    lines = ["[defaults]", "concurrency = 8", ""]
    for r in range(REPOS):
        lines += ["[[mirror]]", f'source = "{src}/lib/app{r}"', f'destination = "{dst}/mirror/app{r}"',
                  "include = ['^1\\.\\d+$']", ""]
    if broken:  # an image that does not exist, and a repository whose tags cannot be listed
        lines += ["[[mirror]]", f'source = "{src}/lib/broken"', f'destination = "{dst}/mirror/broken"',
                  'tags = ["1.0"]', "",
                  "[[mirror]]", f'source = "{src}/lib/missing"', f'destination = "{dst}/mirror/missing"', ""]
    path.write_text("\n".join(lines))
    return path


async def _mirror(plan: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobflow", "mirror", "--plain-http", str(plan), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_mirror_plan_moves_every_tag_once_then_nothing(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path, layouts: Path,
) -> None:
    digests = await _populate(registry, layouts, tmp_path)
    p = await proxy(registry)
    plan = _plan(tmp_path / "plan.toml", p.host, registry2.host)

    code, out, err = await _mirror(plan, "--report", str(tmp_path / "report.json"), "--state-dir",
                                   str(tmp_path / "state"))
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["images"]) == REPOS * TAGS
    dest = blobflow.Client(blobflow.EngineConfig(plain_http=True))
    for name, digest in digests.items():
        raw = await dest.inspect(f"{registry2.host}/{name.replace('lib/', 'mirror/')}")
        assert str(raw.digest) == digest, name
    assert {i["source"].removeprefix(f"{p.host}/"): i["source_digest"] for i in report["images"]} == digests
    assert all(i["source_digest"] == i["destination_digest"] for i in report["images"])
    # an image new at the destination costs the source one manifest GET and no HEAD before it
    manifest_requests = collections.Counter(method for method, path, _ in p.log if "/manifests/" in path)
    assert manifest_requests == {"GET": REPOS * TAGS}
    # every blob crossed once: the shared base layer was fetched once, then mounted
    blob_gets = [path for method, path, _ in p.log if method == "GET" and BLOB_PATH.match(path)]
    assert len(blob_gets) == len(set(blob_gets))
    base = _base_layer(layouts / "0-0")
    assert sum(path.endswith(base) for path in blob_gets) == 1
    assert sum(i["mounted"] for i in report["images"]) >= REPOS - 1
    assert report["requests_per_host"][p.host] > 0

    # a second run: one HEAD per side and image, no blob traffic at all
    before = dict(p.counters)
    code, out, err = await _mirror(plan, "--state-dir", str(tmp_path / "state"))
    assert code == 0, err
    assert p.counters["blob_get"] == before.get("blob_get", 0)
    assert p.counters["bytes_to_client"] - before.get("bytes_to_client", 0) < 16 * KiB  # tag lists only
    assert out.count("up to date") >= REPOS * TAGS
    second = collections.Counter(method for method, path, _ in p.log if "/manifests/" in path) - manifest_requests
    assert second == {"HEAD": REPOS * TAGS}


async def test_one_broken_image_exits_3_and_the_rest_are_mirrored(
    registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path, layouts: Path,
) -> None:
    digests = await _populate(registry, layouts, tmp_path)
    plan = _plan(tmp_path / "plan.toml", registry.host, registry2.host, broken=True)
    code, out, err = await _mirror(plan, "--report", str(tmp_path / "r.json"), "--state-dir",
                                   str(tmp_path / "state"))
    assert code == 3, (out, err)
    report = json.loads((tmp_path / "r.json").read_text())
    failed = [i for i in report["images"] if i["status"] == "failed"]
    assert [i["source"] for i in failed] == [f"{registry.host}/lib/broken:1.0", f"{registry.host}/lib/missing"]
    assert "MANIFEST_UNKNOWN" in failed[0]["error"] or "NAME_UNKNOWN" in failed[0]["error"]
    assert failed[1]["error"].startswith("listing tags: ") and "NAME_UNKNOWN" in failed[1]["error"]
    assert sum(i["status"] == "copied" for i in report["images"]) == len(digests)
    failures = [f"blobflow: failed: {i['source']} -> {i['destination']}: {i['error']}" for i in failed]
    assert [line for line in err.splitlines() if line.startswith("blobflow: failed: ")] == failures
    assert "2 failed" in out
    # -q keeps them: on standard error, the only output (`2>errors.log` of a nightly job)
    code, out, err = await _mirror(plan, "-q", "--state-dir", str(tmp_path / "state"))
    assert (code, out, err.splitlines()) == (3, "", failures)


async def test_every_repository_is_listed_at_once(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path, layouts: Path,
) -> None:
    """A remote source answers each request a round trip later: listing the plan's repositories
    one after another would cost a round trip each before the last one's images could start."""
    await _populate(registry, layouts, tmp_path)
    listed: list[float] = []

    def tag_list(request: web.Request) -> bool:
        if request.path.endswith("/tags/list"):
            listed.append(time.monotonic())
            return True
        return False

    rtt = 0.5
    p = await proxy(registry, Faults(latency=rtt, match=tag_list))
    code, _, err = await _mirror(_plan(tmp_path / "plan.toml", p.host, registry2.host), "--state-dir",
                                 str(tmp_path / "state"))
    assert code == 0, err
    assert len(listed) == REPOS
    assert max(listed) - min(listed) < rtt  # every listing went out before the first answer came back


async def test_shards_mirror_the_whole_plan_exactly_once(
    registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path, layouts: Path,
) -> None:
    digests = await _populate(registry, layouts, tmp_path)
    plan = _plan(tmp_path / "plan.toml", registry.host, registry2.host)
    seen: list[str] = []
    for i in range(3):
        code, _, err = await _mirror(plan, "--shard", f"{i}/3", "--report", str(tmp_path / f"r{i}.json"),
                                     "--state-dir", str(tmp_path / "state"))
        assert code == 0, err
        report = json.loads((tmp_path / f"r{i}.json").read_text())
        assert all(x["status"] == "copied" for x in report["images"]), report
        seen += [x["source"] for x in report["images"]]
    assert sorted(seen) == sorted(f"{registry.host}/{name}" for name in digests)


async def test_dry_run_writes_nothing(
    registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path, layouts: Path,
) -> None:
    await _populate(registry, layouts, tmp_path)
    plan = _plan(tmp_path / "plan.toml", registry.host, registry2.host)
    code, out, err = await _mirror(plan, "--dry-run", "--report", str(tmp_path / "dry.json"),
                                   "--state-dir", str(tmp_path / "mirror-state"))
    assert code == 0, err
    assert out.count("would copy") == REPOS * TAGS
    assert not (tmp_path / "mirror-state" / "locations").exists()  # a guess is no mount hint for later jobs
    with pytest.raises(blobflow.NotFoundError):
        await blobflow.Client(blobflow.EngineConfig(plain_http=True)).inspect(f"{registry2.host}/mirror/app0:1.0")

    # what it said would move is what moves: the base layer all 40 images share counts once, and
    # is mounted into the other repositories, not counted again in each image
    code, out, err = await _mirror(plan, "--report", str(tmp_path / "real.json"),
                                   "--state-dir", str(tmp_path / "mirror-state"))
    assert code == 0, err
    dry, real = (json.loads((tmp_path / name).read_text())["images"] for name in ("dry.json", "real.json"))
    for key in ("bytes", "blobs", "skipped", "mounted", "shared"):
        assert sum(i[key] for i in dry) == sum(i[key] for i in real), key
    assert sum(i["mounted"] for i in dry) == REPOS - 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_an_interrupted_mirror_stops_exits_130_and_the_same_command_resumes(
    sig: signal.Signals, registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
    layouts: Path,
) -> None:
    """Ctrl-C (or SIGTERM) part-way through a plan stops the job there: exit 130 with the resume
    hint, no traceback. Before, each image future awaited at the time swallowed the cancellation,
    so the mirror ran to its end and then failed with an internal error and exit 1."""
    digests = await _populate(registry, layouts, tmp_path)
    slow = await proxy(registry, Faults(bandwidth=150_000))  # the plan's ~0.9 MB take about 6 s
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobflow", "mirror", "--plain-http", "--state-dir", str(state),
        str(_plan(tmp_path / "slow.toml", slow.host, registry2.host)),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=sigint_as_at_a_terminal)
    while slow.counters["bytes_to_client"] < 200 * KiB and proc.returncode is None:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = await proc.communicate()
    assert proc.returncode == 130, stderr
    assert b"interrupted; run the same command again to resume" in stderr
    assert b"Traceback" not in stderr and b"internal error" not in stderr

    # the job stopped where it was: the same plan, run again (here without the slow link), has
    # images left to copy, and afterwards the destination holds every one of them
    code, _, err = await _mirror(_plan(tmp_path / "plan.toml", registry.host, registry2.host),
                                 "--report", str(tmp_path / "again.json"), "--state-dir", str(state))
    assert code == 0, err
    assert "copied" in _statuses(tmp_path / "again.json")
    dest = blobflow.Client(blobflow.EngineConfig(plain_http=True))
    for name, digest in digests.items():
        raw = await dest.inspect(f"{registry2.host}/{name.replace('lib/', 'mirror/')}")
        assert str(raw.digest) == digest, name


def _statuses(report: Path) -> list[str]:
    return [i["status"] for i in json.loads(report.read_text())["images"]]


async def test_a_platform_selection_is_up_to_date_next_time_without_a_source_get(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    """Some platforms of an index make a new index, which never has the source's digest: its
    annotations say what it was made from, and the next run reads only those (a manifest GET at
    Docker Hub counts against the pull limit). Other platforms, or all of them, move again."""
    build_image(tmp_path / "img", "1.0", [16 * KiB], seed=90, platforms=["linux/amd64", "linux/arm64", "linux/s390x"])
    await blobflow.Client().push(tmp_path / "img", f"{registry.host}/lib/multi:1.0")
    source_digest = (await blobflow.Client(blobflow.EngineConfig(plain_http=True)).inspect(
        f"{registry.host}/lib/multi:1.0")).digest
    p = await proxy(registry)
    plan, report = tmp_path / "plan.toml", tmp_path / "r.json"

    def write(platforms: str) -> None:
        plan.write_text(f'[[mirror]]\nsource = "{p.host}/lib/multi"\ndestination = "{registry2.host}/m/multi"\n'
                        f'tags = ["1.0"]\n{platforms}\n')

    async def run() -> tuple[list[str], int]:
        gets = p.counters["requests:GET"]
        code, out, err = await _mirror(plan, "--report", str(report), "--state-dir", str(tmp_path / "state"))
        assert code == 0, (out, err)
        return _statuses(report), p.counters["requests:GET"] - gets

    write('platforms = ["linux/s390x", "linux/arm64"]')
    assert (await run())[0] == ["copied"]
    index = (await blobflow.Client(blobflow.EngineConfig(plain_http=True)).inspect(
        f"{registry2.host}/m/multi:1.0")).doc
    assert [c["platform"]["architecture"] for c in index["manifests"]] == ["arm64", "s390x"]
    assert index["annotations"] == {"dev.blobflow.platforms.from": str(source_digest),
                                    "dev.blobflow.platforms": "linux/arm64,linux/s390x"}
    assert await run() == (["up to date"], 0)

    write('platforms = ["linux/arm64"]')  # another selection
    assert (await run())[0] == ["copied"]
    write("")  # every platform: the source's own index
    assert (await run())[0] == ["copied"]
    assert await run() == (["up to date"], 0)
    write('platforms = ["linux/amd64", "linux/arm64", "linux/s390x"]')  # all of them: the same index
    assert await run() == (["up to date"], 0)


async def test_a_platform_selection_keeps_the_attestations_of_its_images(
    registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path,
) -> None:
    """buildx lists an attestation manifest (SBOM, provenance; platform unknown/unknown) beside each
    platform's image. A selection keeps those of the images it keeps; selecting every platform
    keeps the source's own index, digest and all (it used to be rewritten without them)."""
    build_image(tmp_path / "img", "1.0", [16 * KiB], seed=91, platforms=["linux/amd64", "linux/arm64"],
                attestations=True)
    await blobflow.Client().push(tmp_path / "img", f"{registry.host}/lib/att:1.0")
    client = blobflow.Client(blobflow.EngineConfig(plain_http=True))
    source = await client.inspect(f"{registry.host}/lib/att:1.0")
    images = {c["platform"]["architecture"]: c["digest"] for c in source.doc["manifests"]
              if c["platform"]["os"] != "unknown"}
    plan = tmp_path / "plan.toml"

    async def mirror(platforms: str, repo: str) -> dict[str, Any]:
        plan.write_text(f'[[mirror]]\nsource = "{registry.host}/lib/att"\ndestination = "{registry2.host}/{repo}"\n'
                        f'tags = ["1.0"]\n{platforms}\n')
        code, out, err = await _mirror(plan, "--state-dir", str(tmp_path / "state"))
        assert code == 0, (out, err)
        return (await client.inspect(f"{registry2.host}/{repo}:1.0")).doc

    some = await mirror('platforms = ["linux/arm64"]', "m/some")
    assert [(c["platform"]["architecture"], (c.get("annotations") or {}).get("vnd.docker.reference.digest"))
            for c in some["manifests"]] == [("arm64", None), ("unknown", images["arm64"])]
    every = await mirror('platforms = ["linux/amd64", "linux/arm64"]', "m/every")
    assert every == source.doc
    assert (await client.inspect(f"{registry2.host}/m/every:1.0")).digest == source.digest


async def test_a_flaky_source_and_destination_are_retried_down_to_every_head(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path, layouts: Path,
) -> None:
    """503s on any request, the up-to-date HEADs and tag lists included, are retried as the
    product promises: the plan completes and a re-run finds everything up to date. (One in ten:
    a blob attempt makes three requests, and five retries in a row must not all fail.)"""
    digests = await _populate(registry, layouts, tmp_path)
    src = await proxy(registry, Faults(status={503: 0.1}, seed=7))
    dst = await proxy(registry2, Faults(status={503: 0.1}, seed=8))
    plan = _plan(tmp_path / "plan.toml", src.host, dst.host)
    for _ in range(2):
        code, out, err = await _mirror(plan, "--report", str(tmp_path / "r.json"), "--state-dir",
                                       str(tmp_path / "state"))
        assert code == 0, (out, err)
    assert _statuses(tmp_path / "r.json") == ["up to date"] * len(digests)
    assert src.counters["status:503"] > 0 and dst.counters["status:503"] > 0


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
async def test_a_report_that_could_not_be_written_is_refused_before_anything_moves(
        where: str, registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
        layouts: Path) -> None:
    """Before, the whole plan ran and only then did writing the report fail: exit 1, no summary,
    no report. A typo in --report of a nightly mirror cost the night's figures."""
    await _populate(registry, layouts, tmp_path)
    p = await proxy(registry)
    report = tmp_path / "no-such-dir" / "report.json" if where == "missing-dir" else tmp_path
    code, out, err = await _mirror(_plan(tmp_path / "plan.toml", p.host, registry2.host), "--report", str(report))
    assert code == 2, (out, err)
    assert err.startswith(f"blobflow: --report {report}: ") and len(err.strip().splitlines()) == 1, err
    assert p.counters["requests"] == 0 and out == ""


async def test_the_report_is_written_after_the_summary_and_whole(
        registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path, layouts: Path) -> None:
    await _populate(registry, layouts, tmp_path)
    report = tmp_path / "report.json"
    report.write_text("an older report")
    plan = _plan(tmp_path / "plan.toml", registry.host, registry2.host)
    code, out, err = await _mirror(plan, "--report", str(report))
    assert code == 0, err
    assert f"{REPOS * TAGS} images" in out
    assert len(json.loads(report.read_text())["images"]) == REPOS * TAGS
    assert not list(tmp_path.glob(".report.json*"))  # noqa: ASYNC240 - no temporary file left


async def test_mirror_reports_the_pull_quota_a_registry_tells_and_stops_when_it_is_spent(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    """Docker Hub counts pulls and says what is left (RateLimit-Remaining: 76;w=21600). A mirror
    run says it, so a nightly job sees the quota it burns; a 429 that says nothing is left is not
    retried (it refills over hours: five retries only spend minutes), and names the quota."""
    build_image(tmp_path / "img", "v1", [20_000], seed=91)
    await blobflow.Client(blobflow.EngineConfig(plain_http=True)).push(tmp_path / "img", f"{registry.host}/lib/q:v1")
    hub = {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "76;w=21600"}
    p = await proxy(registry, Faults(headers=hub))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[mirror]]\nsource = "{p.host}/lib/q"\n'
                    f'destination = "{registry2.host}/mirror/q"\ntags = ["v1"]\n')

    code, out, err = await _mirror(plan, "--report", str(tmp_path / "report.json"))
    assert code == 0, err
    assert out.splitlines()[-1].endswith(f"; pull quota left at {p.host}: 76 of 100 per 6 h"), out
    assert json.loads((tmp_path / "report.json").read_text())["quota_per_host"] == {
        p.host: {"remaining": 76, "limit": 100, "window_seconds": 21600}}

    spent = await proxy(registry, Faults(status={429: 1.0}, retry_after=None,
                                         headers={**hub, "RateLimit-Remaining": "0;w=21600"}))
    plan.write_text(plan.read_text().replace(p.host, spent.host).replace("mirror/q", "mirror/q2"))
    code, out, err = await _mirror(plan, "--retries", "5")
    assert code == 1, out + err
    assert f"the pull quota of {spent.host} is spent (0 of 100 per 6 h)" in err, err
    assert spent.counters["status:429"] == 1  # asked once, not five times more


async def test_the_rate_limits_the_sources_and_not_the_destination(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    """--rate is politeness owed to the registries one mirrors from. It also spaced every request
    to one's own destination, which slowed the mirror for nothing."""
    src = tmp_path / "src"
    build_image(src, "1.0", [16 * KiB, 16 * KiB], seed=66)
    await blobflow.Client().push(src, f"{registry.host}/lib/rated:1.0")
    seen: dict[str, list[float]] = {"source": [], "destination": []}

    def stamp(side: str) -> Faults:
        return Faults(match=lambda r: seen[side].append(time.monotonic()) is None and False)

    source, destination = await proxy(registry, stamp("source")), await proxy(registry2, stamp("destination"))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[mirror]]\nsource = "{source.host}/lib/rated"\ndestination = "{destination.host}/m/rated"\n'
                    'tags = ["1.0"]\n')
    code, out, err = await _mirror(plan, "--rate", "4", "--state-dir", str(tmp_path / "state"))
    assert code == 0, out + err

    def gaps(times: list[float]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(times)]

    assert len(seen["source"]) >= 3 and min(gaps(seen["source"])) >= 0.2  # 4 per second
    assert len(seen["destination"]) >= 5 and min(gaps(seen["destination"])) < 0.1


async def test_bytes_an_image_moved_before_it_failed_are_in_the_totals(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    """An image that failed after some of its blobs landed said bytes 0, and so did the summary's
    "moved 0.0 MB", while megabytes had crossed (found counting at the registry)."""
    src = tmp_path / "src"
    desc = build_image(src, "1.0", [64 * KiB, 32 * KiB], seed=67)
    manifest = json.loads((src / "blobs" / "sha256" / desc.digest.hex).read_bytes())
    config, kept, lost = manifest["config"], manifest["layers"][0], manifest["layers"][1]
    await blobflow.Client().push(src, f"{registry.host}/lib/half:1.0")
    front = await proxy(registry, Faults(status={404: 1.0}, latency=0.5, match=lambda r: r.method == "GET"
                                         and r.path.endswith(lost["digest"])))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[mirror]]\nsource = "{front.host}/lib/half"\ndestination = "{registry2.host}/m/half"\n'
                    'tags = ["1.0"]\n')
    code, out, err = await _mirror(plan, "--report", str(tmp_path / "r.json"), "--state-dir", str(tmp_path / "state"))
    assert code == 1, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"][0]["status"] == "failed"
    assert report["bytes"] == config["size"] + kept["size"]
    assert f"moved {report['bytes'] / 1e6:.1f} MB" in out


async def test_a_plans_platforms_hold_for_single_images_too(
    registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path,
) -> None:
    """An index with none of the plan's platforms fails; a single image of another platform was
    mirrored, and every later run called it up to date: arm64 nodes would pull amd64 bytes."""
    src = tmp_path / "src"
    build_image(src, "1.0", [16 * KiB], seed=69)  # one linux/amd64 image, no index
    await blobflow.Client().push(src, f"{registry.host}/lib/one:1.0")
    plan = tmp_path / "plan.toml"

    async def mirror(platforms: str) -> tuple[int, str, str]:
        plan.write_text(f'[[mirror]]\nsource = "{registry.host}/lib/one"\ndestination = "{registry2.host}/m/one"\n'
                        f'tags = ["1.0"]\nplatforms = {platforms}\n')
        return await _mirror(plan, "--state-dir", str(tmp_path / "state"))

    code, out, err = await mirror('["linux/arm64", "linux/s390x"]')
    assert code == 1 and "no linux/arm64, linux/s390x image: " in err and "for linux/amd64" in err, (out, err)
    with pytest.raises(blobflow.NotFoundError):
        await blobflow.Client().inspect(f"{registry2.host}/m/one:1.0")
    code, out, err = await mirror('["linux/amd64"]')
    assert code == 0 and "copied" in out, (out, err)
