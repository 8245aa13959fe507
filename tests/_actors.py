"""The evaluator actors (raypress.pool's PoolMember) this Ray session has started, from the GCS's actor
table (Ray's state API needs the dashboard, which the tests' Ray runs without)."""


def pool_members(alive_only: bool = False) -> dict:
    """{actor id: GCS record} of every PoolMember (dead ones too, unless alive_only)."""
    import ray._private.state as state

    return {a: r for a, r in state.actors().items()
            if r["ActorClassName"] == "PoolMember" and (not alive_only or r["State"] == "ALIVE")}
