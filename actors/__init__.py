"""actors: the Engine (router) and ExpertShard Ray actors, the scheduler, and the transports.

`actors.launch(checkpoint_dir, num_expert_shards=N, micro_batches=M, transport="collective"|"ray")`
starts a router + expert shards model instance (see actors/launch.py). It is imported lazily so
that `import actors` (e.g. for the scheduler) does not import Ray.
"""


def __getattr__(name):
    if name == "launch":
        from .launch import launch
        return launch
    raise AttributeError(f"module 'actors' has no attribute {name!r}")


__all__ = ["launch"]
