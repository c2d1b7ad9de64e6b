"""Launch arguments of the vdd_ros launch files, kept free of `launch` so they can be tested
without a ROS 2 install.

A launch argument left empty passes nothing to its node, so the parameter files in config/ stay
the source of every default; `describe` names that default for `--show-args`. A set argument
becomes a node parameter of the declared type (`node_parameters`), and a topic argument that
differs from the topic's own name becomes a remapping (`remappings`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from vdd_ros.errors import UserError

# node parameter -> (launch argument, type)
ParameterTable = Mapping[str, tuple[str, type]]


def file_parameters(config_dir: str | Path, node: str) -> dict[str, Any]:
    """The parameters that `<config_dir>/<node>.yaml` sets ({} if it cannot be read)."""
    try:
        data = yaml.safe_load((Path(config_dir) / f'{node}.yaml').read_text())
        return dict(data['/**']['ros__parameters'])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return {}


def describe(text: str, config_dir: str | Path, node: str, parameter: str) -> str:
    """`text`, then what an empty argument means: the value in config/<node>.yaml."""
    values = file_parameters(config_dir, node)
    value = values.get(parameter)
    shown = value if isinstance(value, str) and value else repr(value)
    return f"{text}; empty: config/{node}.yaml's {shown if parameter in values else 'value'}"


def typed(argument: str, value: str, kind: type) -> Any:
    """The launch argument `value` (a string) as a `kind`; UserError naming the argument."""
    if kind is str:
        return value
    if kind is bool:
        if value.lower() not in ('true', 'false'):
            raise UserError(f'launch argument {argument}: expected true or false, got {value!r}')
        return value.lower() == 'true'
    try:
        return kind(value)
    except ValueError:
        expected = 'an integer' if kind is int else 'a number'
        raise UserError(f'launch argument {argument}: expected {expected}, got {value!r}') \
            from None


def node_parameters(values: Mapping[str, str], table: ParameterTable) -> dict[str, Any]:
    """{parameter: typed value} for every parameter of `table` whose launch argument is set."""
    return {parameter: typed(argument, values[argument], kind)
            for parameter, (argument, kind) in table.items() if values.get(argument, '') != ''}


def remappings(values: Mapping[str, str], topics: list[str]) -> list[tuple[str, str]]:
    """(topic, new name) for every topic whose launch argument names another topic."""
    return [(topic, values[topic]) for topic in topics
            if values.get(topic, topic) not in ('', topic)]
