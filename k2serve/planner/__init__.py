"""`k2serve planner`: decides prefill and decode replica counts from the router's metrics (`policy`) and
applies them through a connector (`connector`: virtual, `kube`, `ray_actors`, `local`); `simulate` replays
a trace offline (the dry-run).

Data flows one way: router metrics -> `Observation` -> `Planner.decide` -> `Decision` -> `Connector.scale`.
"""
