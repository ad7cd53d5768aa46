"""The baseline a user would write without Ray Serve: FastAPI + uvicorn holding the same student.

Same request and response shapes as the Serve deployment. The endpoint is a plain ``def``, so FastAPI runs each
request's tokenization and forward in its thread pool, padded to the request's longest text. Started by
``serve_load.py`` as ``uvicorn plain_server:app`` with ``STUDENT_DIR`` and ``MAX_LENGTH`` in the environment.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# trust_remote_code: a mean-pooled student (student.pooling) carries its head's code next to its weights.
network = AutoModelForSequenceClassification.from_pretrained(os.environ["STUDENT_DIR"], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(os.environ["STUDENT_DIR"])
labels = [network.config.id2label[i] for i in range(network.config.num_labels)]
max_length = int(os.environ.get("MAX_LENGTH", "64"))
app = FastAPI()


class ClassifyRequest(BaseModel):
    texts: list[str]


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@app.post("/v1/classify")
def classify(request: ClassifyRequest) -> dict:
    with torch.inference_mode():
        batch = tokenizer(request.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        probs = torch.softmax(network(**batch).logits.float(), dim=-1).numpy()
    return {
        "predictions": [
            {
                "label": labels[int(row.argmax())],
                "confidence": float(row.max()),
                "probabilities": dict(zip(labels, map(float, row))),
            }
            for row in probs
        ]
    }
