"""Recovery after carving: layer-local refits (CPU, closed form) and end-to-end distillation."""

from brickwork.recovery.local import LocalRecoveryConfig, RecoveryReport, recover_local_

__all__ = ["LocalRecoveryConfig", "RecoveryReport", "recover_local_"]
