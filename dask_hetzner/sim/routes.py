"""The route table: ``(method, template, operationId of the spec, handler)``."""

from __future__ import annotations

from .handlers import (
    h_add_subnet,
    h_add_to_group,
    h_apply_firewall,
    h_attach,
    h_create_firewall,
    h_create_image,
    h_create_network,
    h_create_placement_group,
    h_create_server,
    h_create_ssh_key,
    h_delete_firewall,
    h_delete_image,
    h_delete_network,
    h_delete_placement_group,
    h_delete_server,
    h_delete_ssh_key,
    h_delete_subnet,
    h_deprecated,
    h_detach,
    h_firewall,
    h_firewalls,
    h_get_action,
    h_get_actions,
    h_image,
    h_images,
    h_location,
    h_locations,
    h_network,
    h_networks,
    h_placement_group,
    h_placement_groups,
    h_pricing,
    h_remove_firewall,
    h_remove_from_group,
    h_server,
    h_server_type,
    h_server_types,
    h_servers,
    h_set_rules,
    h_ssh_key,
    h_ssh_keys,
    h_update_firewall,
    h_update_image,
    h_update_network,
    h_update_placement_group,
    h_update_server,
    h_update_ssh_key,
    power,
    scoped_action,
    scoped_actions,
)
from .replies import Handler, Route
from .schema import Spec, SpecViolation

_TABLE: list[tuple[str, str, str, Handler]] = [
    ("GET", "/actions", "get_actions", h_get_actions),
    ("GET", "/actions/{id}", "get_action", h_get_action),
    ("GET", "/datacenters", "list_datacenters", h_deprecated),
    ("GET", "/datacenters/{id}", "get_datacenter", h_deprecated),
    ("GET", "/server_types", "list_server_types", h_server_types),
    ("GET", "/server_types/{id}", "get_server_type", h_server_type),
    ("GET", "/pricing", "get_pricing", h_pricing),
    ("GET", "/locations", "list_locations", h_locations),
    ("GET", "/locations/{id}", "get_location", h_location),
    ("GET", "/images", "list_images", h_images),
    ("GET", "/images/{id}", "get_image", h_image),
    ("PUT", "/images/{id}", "update_image", h_update_image),
    ("DELETE", "/images/{id}", "delete_image", h_delete_image),
    ("GET", "/ssh_keys", "list_ssh_keys", h_ssh_keys),
    ("POST", "/ssh_keys", "create_ssh_key", h_create_ssh_key),
    ("GET", "/ssh_keys/{id}", "get_ssh_key", h_ssh_key),
    ("PUT", "/ssh_keys/{id}", "update_ssh_key", h_update_ssh_key),
    ("DELETE", "/ssh_keys/{id}", "delete_ssh_key", h_delete_ssh_key),
    ("GET", "/networks", "list_networks", h_networks),
    ("POST", "/networks", "create_network", h_create_network),
    ("GET", "/networks/{id}", "get_network", h_network),
    ("PUT", "/networks/{id}", "update_network", h_update_network),
    ("DELETE", "/networks/{id}", "delete_network", h_delete_network),
    ("POST", "/networks/{id}/actions/add_subnet", "add_network_subnet", h_add_subnet),
    ("POST", "/networks/{id}/actions/delete_subnet", "delete_network_subnet", h_delete_subnet),
    ("GET", "/firewalls", "list_firewalls", h_firewalls),
    ("POST", "/firewalls", "create_firewall", h_create_firewall),
    ("GET", "/firewalls/{id}", "get_firewall", h_firewall),
    ("PUT", "/firewalls/{id}", "update_firewall", h_update_firewall),
    ("DELETE", "/firewalls/{id}", "delete_firewall", h_delete_firewall),
    ("POST", "/firewalls/{id}/actions/set_rules", "set_firewall_rules", h_set_rules),
    ("POST", "/firewalls/{id}/actions/apply_to_resources", "apply_firewall_to_resources", h_apply_firewall),
    ("POST", "/firewalls/{id}/actions/remove_from_resources", "remove_firewall_from_resources", h_remove_firewall),
    ("GET", "/placement_groups", "list_placement_groups", h_placement_groups),
    ("POST", "/placement_groups", "create_placement_group", h_create_placement_group),
    ("GET", "/placement_groups/{id}", "get_placement_group", h_placement_group),
    ("PUT", "/placement_groups/{id}", "update_placement_group", h_update_placement_group),
    ("DELETE", "/placement_groups/{id}", "delete_placement_group", h_delete_placement_group),
    ("GET", "/servers", "list_servers", h_servers),
    ("POST", "/servers", "create_server", h_create_server),
    ("GET", "/servers/{id}", "get_server", h_server),
    ("PUT", "/servers/{id}", "update_server", h_update_server),
    ("DELETE", "/servers/{id}", "delete_server", h_delete_server),
    *(
        ("POST", f"/servers/{{id}}/actions/{verb}", f"{verb}_server", power(verb))
        for verb in ("poweroff", "poweron", "shutdown", "reboot", "reset")
    ),
    ("POST", "/servers/{id}/actions/create_image", "create_server_image", h_create_image),
    ("POST", "/servers/{id}/actions/attach_to_network", "attach_server_to_network", h_attach),
    ("POST", "/servers/{id}/actions/detach_from_network", "detach_server_from_network", h_detach),
    ("POST", "/servers/{id}/actions/add_to_placement_group", "add_server_to_placement_group", h_add_to_group),
    (
        "POST",
        "/servers/{id}/actions/remove_from_placement_group",
        "remove_server_from_placement_group",
        h_remove_from_group,
    ),
    # Actions of one kind, then of one resource.
    *(
        route
        for kind, rtype in (("servers", "server"), ("networks", "network"), ("firewalls", "firewall"), ("images", "image"))
        for route in (
            ("GET", f"/{kind}/actions", f"list_{kind}_actions", scoped_actions(rtype)),
            ("GET", f"/{kind}/actions/{{id}}", f"get_{kind}_action", scoped_action(rtype)),
            ("GET", f"/{kind}/{{id}}/actions", f"list_{rtype}_actions", scoped_actions(rtype)),
            ("GET", f"/{kind}/{{id}}/actions/{{action_id}}", f"get_{rtype}_action", scoped_action(rtype)),
        )
    ),
]

ROUTES = [Route(*row) for row in _TABLE]


def check_routes_against_spec(spec: Spec) -> None:
    """Every route must be an operation of the spec (used by tests)."""
    for route in ROUTES:
        op = spec.operation_by_id(route.operation_id)
        if (op.method, op.path) != (route.method, route.template):
            raise SpecViolation(f"route {route.method} {route.template} is not {op.operation_id}")
