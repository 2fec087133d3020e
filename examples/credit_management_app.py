"""An app written for credit-management 0.7.1, moved to this gateway by its import lines alone.

Run it next to Redis (and `credit-gateway worker`, on the same CREDIT_* settings):

    CREDIT_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.credit_management_app:app

Without CREDIT_REDIS_URL it runs embedded (an in-process Redis, the worker inside, SQLite).
A request to /api/chat holds X-Estimated-Tokens (or 1,000) tokens' worth of credit for the
X-User-Id user, and is charged what the handler recorded: 402 INSUFFICIENT_CREDITS when the
user cannot cover the hold, X-Credits-Deducted on the answer.
"""

from decimal import Decimal

from fastapi import FastAPI

# Was: from credit_management import CreditMiddleware, addLlmUsage
from gateway.library.compat import CreditMiddleware, addLlmUsage, credit_engine

credits = credit_engine()  # the CREDIT_* environment: Redis, the store; opened by the lifespan

app = FastAPI(lifespan=credits.lifespan)
app.add_middleware(
    CreditMiddleware,
    engine=credits,
    path_prefix="/api",
    user_id_header="X-User-Id",
    default_estimated_tokens=1000,
    skip_paths=["/api/health"],
)


@app.get("/api/health")
async def health():
    return {"status": "ok"}


@app.post("/api/chat")
async def chat(body: dict):
    reply = f"echo: {body.get('message', '')}"  # your own LLM call
    addLlmUsage(
        model="gpt-4o-mini",
        provider="openai",
        cost=Decimal("0.0042"),  # credits; a Decimal or a string, never a float
        metadata={"feature": "chat"},
    )
    return {"reply": reply}
