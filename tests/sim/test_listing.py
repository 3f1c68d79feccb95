"""Pagination, label selectors, filters and sorting; 200 servers listed fast."""

from __future__ import annotations

import gc
import time

import pytest
from sim_helpers import Raw, delete_all, server_body, ssh_public_key

PAGINATION_KEYS = {"page", "per_page", "previous_page", "next_page", "last_page", "total_entries"}


async def _keys(raw: Raw, labels: list[dict[str, str]]) -> None:
    for i, lab in enumerate(labels):
        r = await raw.post(
            "/ssh_keys", {"name": f"k{i}", "public_key": ssh_public_key(), "labels": lab}
        )
        assert r.status == 201, r.body


async def test_pagination_meta_and_link_header(asim):
    async with Raw(asim) as raw:
        await _keys(raw, [{"n": str(i)} for i in range(7)])
        r = await raw.get("/ssh_keys", params={"per_page": 3, "page": 2, "label_selector": "n"})
        assert [k["name"] for k in r.body["ssh_keys"]] == ["k3", "k4", "k5"]
        assert r.body["meta"]["pagination"] == {
            "page": 2,
            "per_page": 3,
            "previous_page": 1,
            "next_page": 3,
            "last_page": 3,
            "total_entries": 7,
        }
        link = r.headers["Link"]
        assert 'rel="prev"' in link and 'rel="next"' in link and 'rel="last"' in link
        assert "page=3&per_page=3" in link and "label_selector=n" in link
        # Defaults, the maximum, and past the end.
        r = await raw.get("/ssh_keys")
        assert r.body["meta"]["pagination"]["per_page"] == 25
        assert set(r.body["meta"]["pagination"]) == PAGINATION_KEYS
        assert r.body["meta"]["pagination"]["next_page"] is None
        r = await raw.get("/ssh_keys", params={"per_page": 500})
        assert r.body["meta"]["pagination"]["per_page"] == 50
        r = await raw.get("/ssh_keys", params={"page": 9, "per_page": 3})
        assert r.body["ssh_keys"] == [] and r.body["meta"]["pagination"]["last_page"] == 3
        for bad in ({"page": 0}, {"page": "x"}, {"per_page": "1.5"}):
            r = await raw.get("/ssh_keys", params=bad)
            assert (r.status, r.code) == (400, "invalid_input"), bad
        await delete_all(raw, asim)


SELECTOR_CASES = [
    ("env=prod", {"a", "b"}),
    ("env==prod", {"a", "b"}),
    ("env!=prod", {"c", "d", "e"}),
    ("env", {"a", "b", "c", "d"}),
    ("!env", {"e"}),
    ("env in (prod,dev)", {"a", "b", "c"}),
    ("env notin (prod, dev)", {"d", "e"}),
    ("env=prod,tier=db", {"b"}),
    ("env=prod,!tier", {"a"}),
    ("example.com/team=x", {"c"}),
    ("tier", {"b", "d"}),
    ("  env = prod ,  tier  ", {"b"}),
    ("env=", set()),
]


async def test_label_selectors(asim):
    labels = {
        "a": {"env": "prod"},
        "b": {"env": "prod", "tier": "db"},
        "c": {"env": "dev", "example.com/team": "x"},
        "d": {"env": "test", "tier": "web"},
        "e": {},
    }
    async with Raw(asim) as raw:
        for name, lab in labels.items():
            r = await raw.post("/placement_groups", {"name": name, "type": "spread", "labels": lab})
            assert r.status == 201
        for selector, expected in SELECTOR_CASES:
            r = await raw.get("/placement_groups", params={"label_selector": selector})
            assert r.status == 200, (selector, r.body)
            assert {p["name"] for p in r.body["placement_groups"]} == expected, selector
        for bad in (
            "env in (prod",
            "=prod",
            "env=prod,,x",
            "a b",
            "env in ()",
            "k=v v",
            "env!",
            "-bad=1",
        ):
            r = await raw.get("/placement_groups", params={"label_selector": bad})
            assert (r.status, r.code) == (400, "invalid_input"), bad
            assert r.body["error"]["details"]["fields"][0]["name"] == "label_selector"
        await delete_all(raw, asim)


async def test_name_status_and_sort(asim):
    async with Raw(asim) as raw:
        for name in ("bravo", "alpha", "charlie"):
            r = await raw.post("/servers", server_body(name, start_after_create=name != "alpha"))
            assert r.status == 201
        await asim.settle()
        r = await raw.get("/servers", params={"name": "bravo"})
        assert [s["name"] for s in r.body["servers"]] == ["bravo"]
        r = await raw.get("/servers", params=[("status", "off"), ("status", "running")])
        assert len(r.body["servers"]) == 3
        r = await raw.get("/servers", params={"status": "off"})
        assert [s["name"] for s in r.body["servers"]] == ["alpha"]
        r = await raw.get("/servers", params={"sort": "name"})
        assert [s["name"] for s in r.body["servers"]] == ["alpha", "bravo", "charlie"]
        r = await raw.get("/servers", params={"sort": "name:desc"})
        assert [s["name"] for s in r.body["servers"]] == ["charlie", "bravo", "alpha"]
        r = await raw.get("/servers", params={"sort": "id:desc"})
        assert [s["name"] for s in r.body["servers"]] == ["charlie", "alpha", "bravo"]
        r = await raw.get("/servers", params=[("sort", "status:asc"), ("sort", "name:desc")])
        assert r.status == 400  # status is not a sort field of servers
        r = await raw.get(
            "/servers", params=[("status", "running"), ("sort", "created:desc"), ("sort", "name")]
        )
        assert [s["name"] for s in r.body["servers"]] == ["charlie", "bravo"]
        r = await raw.get("/servers", params={"status": "bogus"})
        assert (r.status, r.code) == (400, "invalid_input")
        r = await raw.get("/images", params={"name": "ubuntu-24.04", "architecture": "arm"})
        assert [(i["name"], i["architecture"]) for i in r.body["images"]] == [
            ("ubuntu-24.04", "arm")
        ]
        r = await raw.get("/server_types", params={"name": "cx22"})
        assert r.body["server_types"][0]["deprecated"] is True
        await delete_all(raw, asim)


@pytest.mark.timeout(60)
async def test_two_hundred_servers_list_fast(asim):
    async with Raw(asim) as raw:
        for i in range(200):
            r = await raw.post(
                "/servers",
                server_body(
                    f"w-{i:03d}",
                    location=["fsn1", "nbg1", "hel1", "ash"][i % 4],
                    labels={"cluster": "big"},
                ),
            )
            assert r.status == 201, r.body
        await asim.settle()
        # A full collection of this test process's heap (dask, the SDK, earlier
        # tests) can pause ~100 ms; that is not the simulator's cost.
        gc.collect()
        gc.freeze()
        names = []
        try:
            for page in range(1, 5):
                # Best of three: a busy machine delays single answers; a slow listing is slow
                # every time.
                elapsed = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    r = await raw.get(
                        "/servers", params={"label_selector": "cluster=big", "page": page, "per_page": 50}
                    )
                    elapsed = min(elapsed, time.perf_counter() - t0)
                    assert r.status == 200 and len(r.body["servers"]) == 50
                assert elapsed < 0.1, f"page {page} took {elapsed * 1000:.0f} ms"
                names += [s["name"] for s in r.body["servers"]]
        finally:
            gc.unfreeze()
        assert names == [f"w-{i:03d}" for i in range(200)]
        assert r.body["meta"]["pagination"]["next_page"] is None
        ips = {s.host_ip for s in asim.store.servers.values()}
        assert len(ips) == 200 and "127.0.0.1" not in ips
        assert not any(ip.endswith((".0", ".255")) for ip in ips)
        await delete_all(raw, asim)
