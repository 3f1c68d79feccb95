"""A corpus of bad requests: each gets the status and code the real API gives."""

from __future__ import annotations

import pytest
from sim_helpers import Raw, delete_all, server_body, ssh_public_key

from dask_hetzner.sim import Simulator


def fields(answer) -> set[str]:
    return {f["name"] for f in answer.body["error"]["details"]["fields"]}


async def test_auth_routing_and_json(asim):
    async with Raw(asim) as raw:
        for headers, auth in (
            ({}, False),
            ({"Authorization": "Bearer nope"}, False),
            ({"Authorization": f"Token {asim.token}"}, False),
        ):
            r = await raw.get("/servers", headers=headers, auth=auth)
            assert (r.status, r.code) == (401, "unauthorized")
            assert "RateLimit-Remaining" in r.headers
        cases = [
            ("GET", "/nope", 404, "not_found"),
            ("GET", f"http://127.0.0.1:{asim.port}/servers", 404, "not_found"),
            ("GET", "/servers/abc", 404, "not_found"),
            ("GET", "/servers/999", 404, "not_found"),
            ("GET", "/ssh_keys/999", 404, "not_found"),
            ("GET", "/networks/999", 404, "not_found"),
            ("GET", "/firewalls/999", 404, "not_found"),
            ("GET", "/placement_groups/999", 404, "not_found"),
            ("GET", "/images/999", 404, "not_found"),
            ("GET", "/actions/999", 404, "not_found"),
            ("GET", "/server_types/999", 404, "not_found"),
            ("GET", "/locations/999", 404, "not_found"),
            ("DELETE", "/servers/999", 404, "not_found"),
            ("POST", "/servers/999/actions/poweron", 404, "not_found"),
            ("GET", "/volumes", 404, "not_found"),  # in the spec, not simulated
            ("DELETE", "/server_types", 405, "method_not_allowed"),
            ("PATCH", "/servers", 405, "method_not_allowed"),
            ("POST", "/locations", 405, "method_not_allowed"),
            ("GET", "/datacenters", 410, "deprecated_api_endpoint"),
            ("GET", "/actions", 410, "deprecated_api_endpoint"),
        ]
        for method, path, status, code in cases:
            r = await raw.call(method, path)
            assert (r.status, r.code) == (status, code), (method, path, r.body)
        for data in ("{bad", "[1,", '{"name": }', "\xff"):
            r = await raw.call(
                "POST",
                "/servers",
                data=data.encode("latin-1"),
                headers={"Content-Type": "application/json"},
            )
            assert (r.status, r.code) == (400, "json_error"), data
        r = await raw.call(
            "PUT", "/ssh_keys/1", data=b"{", headers={"Content-Type": "application/json"}
        )
        assert (r.status, r.code) == (400, "json_error")
        r = await raw.post("/servers", [1, 2])
        assert (r.status, r.code) == (422, "invalid_input")
        r = await raw.post("/servers", {"name": "x" * (5 * 1024 * 1024)})
        assert r.status == 413
    assert asim.stats.statuses[500] == 0


BAD_SERVERS = [
    ({}, {"name", "server_type", "image"}),
    ({"name": 5, "server_type": "cx23", "image": "ubuntu-24.04"}, {"name"}),
    (server_body("a", labels="x"), {"labels"}),
    (server_body("a", labels={"k": 1}), {"labels.k"}),
    (server_body("a", ssh_keys="abc"), {"ssh_keys"}),
    (server_body("a", networks=["a"]), {"networks.0"}),
    (server_body("a", firewalls=[{"id": 1}]), {"firewalls.0.firewall"}),
    (server_body("a", start_after_create="yes"), {"start_after_create"}),
    (server_body("a", user_data=5), {"user_data"}),
    (server_body("a", placement_group="pg"), {"placement_group"}),
    (server_body("a", server_type="cx99"), {"server_type"}),
    (server_body("a", location="mars"), {"location"}),
    (server_body("a", image="windows-11"), {"image"}),
    (server_body("a", image=999999), {"image"}),
    (server_body("a", ssh_keys=["missing"]), {"ssh_keys.0"}),
    (server_body("a", networks=[999]), {"networks.0"}),
    (server_body("a", firewalls=[{"firewall": 999}]), {"firewalls.0.firewall"}),
    (server_body("a", placement_group=999), {"placement_group"}),
    (server_body("a", user_data="x" * (32 * 1024 + 1)), {"user_data"}),
    (server_body("under_score"), {"name"}),
    (server_body("-lead"), {"name"}),
    (server_body("a..b"), {"name"}),
    (server_body("x" * 64), {"name"}),
    (server_body(""), {"name"}),
    (server_body("a", labels={"hetzner.cloud/x": "1"}), {"labels"}),
    (server_body("a", labels={"a b": "c"}), {"labels"}),
    (server_body("a", labels={"k": "v v"}), {"labels"}),
    (server_body("a", labels={"k": "x" * 64}), {"labels"}),
    (server_body("a", labels={"Bad.Prefix/k": "v"}), {"labels"}),
    (server_body("a", server_type="cax11", image=161547264), {"image"}),  # x86 image on arm
]


async def test_bad_server_requests(asim):
    async with Raw(asim) as raw:
        for body, expected in BAD_SERVERS:
            r = await raw.post("/servers", body)
            assert (r.status, r.code) == (422, "invalid_input"), (
                body if len(str(body)) < 200 else "big",
                r.body,
            )
            assert fields(r) == expected, (str(body)[:200], r.body)
            assert r.body["error"]["message"].startswith("invalid input in field")
        # Unavailable: retired everywhere, sold out here.
        for st, loc in (
            ("cx22", "fsn1"),
            ("cpx11", "nbg1"),
            ("cax41", "hel1"),
            ("ccx63", "sin"),
        ):
            r = await raw.post("/servers", server_body("a", server_type=st, location=loc))
            assert (r.status, r.code) == (412, "resource_unavailable"), (st, loc)
        # Never offered there: a configuration error, 422 as on Hetzner, not a sold-out 412.
        r = await raw.post("/servers", server_body("a", server_type="cx23", location="ash"))
        assert (r.status, r.code) == (422, "invalid_input"), r.body
        assert r.body["error"]["message"] == "unsupported location for server type"
        r = await raw.get("/server_types", params={"name": "cax41"})
        hel1 = next(x for x in r.body["server_types"][0]["locations"] if x["name"] == "hel1")
        assert hel1["available"] is False
        assert asim.leaks() == {}
    assert asim.stats.statuses[500] == 0


async def test_bad_other_resources(asim):
    async with Raw(asim) as raw:
        cases = [
            ("/ssh_keys", {"name": "k"}, {"public_key"}),
            ("/ssh_keys", {"name": "k", "public_key": "not a key"}, {"public_key"}),
            (
                "/ssh_keys",
                {"name": "k", "public_key": "ssh-ed25519 AAAAnotbase64!"},
                {"public_key"},
            ),
            ("/ssh_keys", {"name": "", "public_key": ssh_public_key()}, {"name"}),
            ("/networks", {"name": "n"}, {"ip_range"}),
            ("/networks", {"name": "n", "ip_range": "10.0.0.0/25"}, {"ip_range"}),
            ("/networks", {"name": "n", "ip_range": "8.8.8.0/24"}, {"ip_range"}),
            ("/networks", {"name": "n", "ip_range": "nonsense"}, {"ip_range"}),
            ("/networks", {"name": "n", "ip_range": "10.0.0.1/16"}, {"ip_range"}),
            (
                "/networks",
                {
                    "name": "n",
                    "ip_range": "10.0.0.0/16",
                    "subnets": [
                        {"type": "cloud", "ip_range": "10.1.0.0/24", "network_zone": "eu-central"}
                    ],
                },
                {"subnets.0.ip_range"},
            ),
            (
                "/networks",
                {
                    "name": "n",
                    "ip_range": "10.0.0.0/16",
                    "subnets": [
                        {"type": "cloud", "ip_range": "10.0.0.0/24", "network_zone": "moon"}
                    ],
                },
                {"subnets.0.network_zone"},
            ),
            (
                "/networks",
                {"name": "n", "ip_range": "10.0.0.0/16", "subnets": [{"type": "cloud"}]},
                {"subnets.0.network_zone"},
            ),
            (
                "/firewalls",
                {
                    "name": "f",
                    "rules": [{"direction": "in", "protocol": "tcp", "source_ips": ["0.0.0.0/0"]}],
                },
                {"rules.0.port"},
            ),
            (
                "/firewalls",
                {
                    "name": "f",
                    "rules": [
                        {
                            "direction": "in",
                            "protocol": "icmp",
                            "port": "1",
                            "source_ips": ["0.0.0.0/0"],
                        }
                    ],
                },
                {"rules.0.port"},
            ),
            (
                "/firewalls",
                {"name": "f", "rules": [{"direction": "in", "protocol": "tcp", "port": "22"}]},
                {"rules.0.source_ips"},
            ),
            (
                "/firewalls",
                {
                    "name": "f",
                    "rules": [
                        {"direction": "in", "protocol": "tcp", "port": "22", "source_ips": ["x"]}
                    ],
                },
                {"rules.0.source_ips.0"},
            ),
            (
                "/firewalls",
                {
                    "name": "f",
                    "rules": [
                        {
                            "direction": "in",
                            "protocol": "tcp",
                            "port": "70000",
                            "source_ips": ["::/0"],
                        }
                    ],
                },
                {"rules.0.port"},
            ),
            (
                "/firewalls",
                {"name": "f", "rules": [{"direction": "sideways", "protocol": "tcp"}]},
                {"rules.0.direction"},
            ),
            (
                "/firewalls",
                {"name": "f", "rules": [{"direction": "in", "protocol": "xyz"}]},
                {"rules.0.protocol"},
            ),
            (
                "/firewalls",
                {
                    "name": "f",
                    "apply_to": [
                        {"type": "label_selector", "label_selector": {"selector": "a in ("}}
                    ],
                },
                {"apply_to.0.label_selector.selector"},
            ),
            ("/firewalls", {"name": "x" * 129}, {"name"}),
            ("/placement_groups", {"name": "p", "type": "cluster"}, {"type"}),
            ("/placement_groups", {"name": "p"}, {"type"}),
        ]
        for path, body, expected in cases:
            r = await raw.post(path, body)
            assert (r.status, r.code) == (422, "invalid_input"), (path, body, r.body)
            assert fields(r) == expected, (path, body, r.body)
        r = await raw.post(
            "/firewalls", {"name": "f", "apply_to": [{"type": "server", "server": {"id": 999}}]}
        )
        assert (r.status, r.code) == (404, "firewall_resource_not_found")

        net = (await raw.post("/networks", {"name": "n", "ip_range": "10.0.0.0/16"})).body[
            "network"
        ]
        r = await raw.post(
            f"/networks/{net['id']}/actions/delete_subnet", {"ip_range": "10.0.0.0/24", "extra": 1}
        )
        assert (r.status, r.code, fields(r)) == (422, "invalid_input", {"extra"})
        r = await raw.post(
            f"/networks/{net['id']}/actions/delete_subnet", {"ip_range": "10.0.0.0/24"}
        )
        assert (r.status, r.code) == (404, "not_found")
        r = await raw.put(f"/networks/{net['id']}", {"labels": {"hetzner.cloud/x": "y"}})
        assert (r.status, r.code) == (422, "invalid_input")
        r = await raw.get("/images", params={"type": "system"})
        r = await raw.delete(f"/images/{r.body['images'][0]['id']}")
        assert (r.status, r.code) == (403, "forbidden")
        await delete_all(raw, asim)
    assert asim.stats.statuses[500] == 0


async def test_uniqueness(asim):
    async with Raw(asim) as raw:
        pub = ssh_public_key()
        assert (await raw.post("/ssh_keys", {"name": "k", "public_key": pub})).status == 201
        r = await raw.post("/ssh_keys", {"name": "k", "public_key": ssh_public_key()})
        assert (r.status, r.code, fields(r)) == (409, "uniqueness_error", {"name"})
        r = await raw.post("/ssh_keys", {"name": "k2", "public_key": pub})
        assert (r.status, r.code, fields(r)) == (409, "uniqueness_error", {"public_key"})
        for path, body in (
            ("/networks", {"name": "n", "ip_range": "10.0.0.0/16"}),
            ("/firewalls", {"name": "f"}),
            ("/placement_groups", {"name": "p", "type": "spread"}),
            ("/servers", server_body("s")),
        ):
            assert (await raw.post(path, body)).status == 201
            r = await raw.post(path, body)
            assert (r.status, r.code, fields(r)) == (409, "uniqueness_error", {"name"}), path
        assert (await raw.post("/servers", server_body("t"))).status == 201
        r = await raw.put(
            f"/servers/{asim.store.servers[max(asim.store.servers)].id}", {"name": "s"}
        )
        assert (r.status, r.code) == (409, "uniqueness_error")
        await delete_all(raw, asim)


async def test_limits_placement_and_in_use():
    async with (
        Simulator(hosts=False, validate_responses=True, server_limit=11) as sim,
        Raw(sim) as raw,
    ):
        pg = (await raw.post("/placement_groups", {"name": "pg", "type": "spread"})).body[
            "placement_group"
        ]
        fw = (await raw.post("/firewalls", {"name": "fw"})).body["firewall"]
        for i in range(10):
            r = await raw.post(
                "/servers",
                server_body(f"s{i}", placement_group=pg["id"], firewalls=[{"firewall": fw["id"]}]),
            )
            assert r.status == 201
        r = await raw.post("/servers", server_body("s10", placement_group=pg["id"]))
        assert (r.status, r.code) == (422, "placement_group_member_limit_reached")
        assert r.body["error"]["message"] == f"placement group with ID {pg['id']} contains already 10 servers"
        assert (await raw.post("/servers", server_body("s10"))).status == 201
        r = await raw.post("/servers", server_body("s11"))
        assert (r.status, r.code) == (403, "resource_limit_exceeded")
        assert r.body["error"]["details"] == {"limits": [{"name": "server_limit"}]}
        r = await raw.delete(f"/firewalls/{fw['id']}")
        assert (r.status, r.code) == (422, "resource_in_use")
        r = await raw.delete(f"/placement_groups/{pg['id']}")
        assert (r.status, r.code) == (422, "resource_in_use")
        await delete_all(raw, sim)
        assert sim.leaks() == {}


@pytest.mark.parametrize(
    "path", ["/servers", "/ssh_keys", "/networks", "/firewalls", "/placement_groups"]
)
async def test_wrong_body_types_never_500(asim, path):
    async with Raw(asim) as raw:
        for body in (None, "x", 1, [], {"name": None}, {"name": ["a"]}, {"labels": []}):
            r = await raw.post(path, body)
            assert r.status in (400, 422), (body, r.status, r.body)
            assert r.code in ("invalid_input", "json_error")
    assert asim.stats.statuses[500] == 0
