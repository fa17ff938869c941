"""The HTTP API: `app.create_app` (lifespan, error handlers), `middleware` (metrics, keys, body
limit, draining, early admission), `routes` (one APIRouter), `schemas` (the API's single source of
truth), `openrlhf` (the `/get_reward` contract), `slime` (the `/slime` contract), `docs` (offline
Swagger UI and ReDoc)."""
