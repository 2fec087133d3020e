"""Library mode: metering inside an app that calls LLMs itself. Guide: docs/library.md.

    credits = credit_engine(Settings())            # opened by the app's lifespan
    app = FastAPI(lifespan=credits.lifespan)
    app.add_middleware(CreditMiddleware, engine=credits, pricing=table, reserve="0.5")

    @app.post("/summarise")
    async def summarise(...):
        reply = await my_llm_call(...)
        add_llm_usage(model="gpt-4o", input_tokens=reply.in_tokens, output_tokens=reply.out_tokens)

One module per job: runtime.py opens the engine (credit_engine), usage.py records what a
request's LLM calls cost (add_llm_usage), middleware.py reserves and settles per request
(CreditMiddleware).
"""

from .middleware import DEFAULT_SKIP_METHODS, DEFAULT_SKIP_PATHS, CreditMiddleware
from .runtime import CreditRuntime, credit_engine
from .usage import MAX_CALLS_KEPT, NoMeteredRequest, RequestMeter, UsageError, add_llm_usage

__all__ = [
    "DEFAULT_SKIP_METHODS",
    "DEFAULT_SKIP_PATHS",
    "MAX_CALLS_KEPT",
    "CreditMiddleware",
    "CreditRuntime",
    "NoMeteredRequest",
    "RequestMeter",
    "UsageError",
    "add_llm_usage",
    "credit_engine",
]
