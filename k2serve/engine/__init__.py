"""The single-node engine: scheduler, model runner, sampling and the offline LLM API; and the serving
contract every front door and worker uses (`protocol`, `validation`, `kv_reservation`)."""
