"""Everything `check-config` checks (and `serve`, before anything starts), reported together.

The schema (config.py), the folders the daemon needs (state_dir, model_repository), the models the routes name
and their cards: one run lists every problem under its key, so that a broken config is fixed in one go and
never ends in a traceback (issue 10). A file that cannot be read or parsed as YAML is the one error that stops
the rest.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from edge_agent.config import (
    AgentConfig,
    config_base_dir,
    model_reference_problems,
    parse_config,
    raw_path,
    read_config_file,
)
from edge_agent.errors import ConfigError, ModelError
from edge_agent.inference.card import list_models, load_card


def load_checked(path: Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    """The config in ``path``, checked with its folders and models. Raises ConfigError with every problem."""
    raw = read_config_file(path)
    base = config_base_dir(path)
    problems: list[tuple[str, str]] = []
    config: AgentConfig | None = None
    try:
        config = parse_config(raw, str(path), env, base_dir=base)
    except ConfigError as exc:
        problems.extend(exc.problems)
    reported = {key for key, _ in problems}

    state_dir = config.state_dir if config is not None else raw_path(raw, "state_dir", base)
    if state_dir is not None and "state_dir" not in reported:
        problem = state_dir_problem(state_dir)
        if problem is not None:
            problems.append(("state_dir", problem))

    repository = config.model_repository if config is not None else raw_path(raw, "model_repository", base)
    if repository is not None and "model_repository" not in reported:
        problems.extend(_model_problems(raw, repository, reported))

    if problems:
        raise ConfigError(_unique(problems), str(path))
    assert config is not None  # parse_config raised otherwise, and that is a problem above
    return config


def _model_problems(raw: object, repository: Path, reported: set[str]) -> list[tuple[str, str]]:
    if not repository.is_dir():
        return [("model_repository", f"{repository}: no such folder")]
    try:
        available = list_models(repository)
    except ModelError as exc:
        return [("model_repository", str(exc))]
    problems = [p for p in model_reference_problems(raw, available) if p[0] not in reported]
    routes = raw.get("routes") if isinstance(raw, Mapping) else None
    named = [r.get("model") for r in routes if isinstance(r, Mapping)] if isinstance(routes, list) else []
    models = raw.get("models") if isinstance(raw, Mapping) else None
    for name in dict.fromkeys(n for n in named if isinstance(n, str) and n in available):
        try:
            card = load_card(repository / name)
        except ModelError as exc:
            problems.append((f"models.{name}", str(exc)))
            continue
        deployment = models.get(name) if isinstance(models, Mapping) else None
        point = deployment.get("operating_point") if isinstance(deployment, Mapping) else None
        if isinstance(point, str):
            try:
                card.with_operating_point(point)
            except ValueError as exc:
                problems.append((f"models.{name}.operating_point", str(exc)))
    return problems


def state_dir_problem(path: Path) -> str | None:
    """Why the daemon, running as this user, could not keep its state in ``path``; None if it can.

    The folder may be missing (the daemon creates it) as long as its nearest existing parent is writable.
    """
    user = _user_name()
    target = path
    while True:
        try:
            is_dir = target.is_dir()
            exists = is_dir or target.exists()
        except OSError as exc:
            return f"cannot look at {target}: {exc.strerror} (as user {user})"
        if exists or target.parent == target:
            break
        target = target.parent
    if not is_dir:
        return f"{path} is not a folder" if target == path else f"cannot create {path}: {target} is not a folder"
    if not os.access(target, os.W_OK | os.X_OK):
        where = f"{path} is not writable" if target == path else f"cannot create {path}: {target} is not writable"
        return f"{where} by user {user}"
    return None


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(problems))
