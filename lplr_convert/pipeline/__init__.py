"""A conversion, stage by stage: `plan` (which tensor gets which method and settings), `allocation` (a global bit
budget), `task` (compress one tensor), `executors` (where tasks run: this process, a local pool, Ray), `convert`
(reader -> plan -> tasks -> writer -> manifest and report), `inspect` (the plan without computing), `experts`
(fused MoE expert tensors)."""
