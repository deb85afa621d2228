"""A model's service besides HTTP, one concept per module, all read from the model's `Contract`.

- `schemas`: request and response models (pydantic) of the service's APIs;
- `release`: the released model version loaded from MLflow, and what else the service reads from its environment;
- `metrics`: the service's Prometheus metrics;
- `scorer`: `Scorer`, the scoring a service does (online features, payload log, metrics), and thread settings;
- `auth`: callers' bearer tokens (LOOPFORM_API_TOKENS_FILE), checked before anything is read, scored or logged;
- `limits`: the body-size limit (413, before parsing) and JSON-only content type (415);
- `paths`: unknown request paths folded into one metrics label;
- `openapi`: the OpenAPI document completed with every error answer and the token;
- `bento`: `model_service(contract)`, the BentoML service class of a model (`bentos/<m>/service.py`);
- `process`: `BentoServer`, `bentoml serve` of a service as a subprocess (`loopform up`, tests, benchmarks).

Heavy modules (mlflow, torch, pandas, prometheus_client) are imported inside functions: BentoML sets
PROMETHEUS_MULTIPROC_DIR only after the service module is imported.
"""
