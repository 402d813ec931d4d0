"""The import contract that keeps the gate the only door (pyproject.toml, [tool.importlinter]).

Research views, `$export` and `$aggregate` never import the store's tables, repository,
indexer or raw connections: they reach stored data only through `service/release.py`.
The consent engine imports nothing from `service/`, and `policies/` nothing from the HTTP
layer.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("contract", ["research-through-the-gate", "pure-consent-engine", "policies-know-no-http"])
def test_the_import_contract_is_kept(contract: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    # import-linter's CLI configures logging with dictConfig, which disables every logger that
    # exists (the request log included) for the rest of this test process: restore them after.
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            monkeypatch.setattr(logger, "disabled", logger.disabled)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), limit_to_contracts=(contract,),
                        no_cache=True, no_logo=True) == 0
