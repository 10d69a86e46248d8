"""Plugins from config: the source or destination a floe.yml entry names, found through the registry."""

from __future__ import annotations

from floe.config import FloeConfig
from floe.core.destination import Destination
from floe.core.plugins import destination_registry, source_registry
from floe.core.stream import Context, RunOptions, Source
from floe.infra.pii import source_salt


def context_for(config: FloeConfig, options: RunOptions | None = None) -> Context:
    base = config.path.parent.resolve() if config.path else Context().base_dir
    return Context(base_dir=base, options=options or RunOptions())


def make_source(config: FloeConfig, name: str, context: Context) -> Source:
    settings = config.source(name)
    source_salt(name, settings)  # hashing without a salt is a config error before anything runs
    return source_registry.load(settings.type)(name, settings, context)


def make_destination(config: FloeConfig, name: str, context: Context) -> Destination:
    settings = config.destination(name)
    return destination_registry.load(settings.type)(name, settings, context)
