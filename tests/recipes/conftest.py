"""Helpers shared by the recipe tests."""

import pytest


@pytest.fixture
def kill_bissl_at(monkeypatch):
    """``kill_bissl_at(step, t)``: make the BiSSL trainer's ``step`` (``"_lower_stage"`` or
    ``"_upper_stage"``) raise ``KeyboardInterrupt`` at alternation ``t``, as a killed process
    would stop; returns a function that undoes it."""
    from implicitbilevel.bissl import BiSSLTrainer

    def kill(step: str, t: int):
        original = getattr(BiSSLTrainer, step)

        def killed(self, alternation):
            if alternation == t:
                raise KeyboardInterrupt(f"killed at alternation {t}")
            return original(self, alternation)

        monkeypatch.setattr(BiSSLTrainer, step, killed)
        return lambda: monkeypatch.setattr(BiSSLTrainer, step, original)

    return kill
