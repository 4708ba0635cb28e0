"""The planner: a step-latency model fitted by profiling, a simulator that drives the real controller,
workers, schedulers and block managers on a virtual clock, and DistServe's placement search
(Alg. 1 and Alg. 2, with replication), plus the colocated and chunked baselines.

Pure Python + numpy: `import distserve_jax.planner` (and every module here but `profile_cli`)
never imports JAX or the runtime. `profile_cli` is the one exception: it runs the engine's own
steps on devices, and is imported only by the `profile` command.

Modules:
  - `latency_model`: the paper's step-time forms, KV-transfer time, KV capacity; profiles (JSON).
  - `fit`: least-squares fits of those forms, held-out error per regime.
  - `sim_runner`: the simulated runner (a step completes at now + the model's time) and KV pulls.
  - `simulator`: the virtual-clock executor that hosts real `InstanceWorker`s, and `simulate`.
  - `deployment`: what is simulated (instances, their tp/pp, nodes, KV blocks) and placement YAML.
  - `search`: goodput by bisection, Alg. 1, Alg. 2, baselines.
  - `cli` / `__main__`: `python -m distserve_jax.planner profile|plan|simulate`.
"""
