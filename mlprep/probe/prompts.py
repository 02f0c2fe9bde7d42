"""What probe_qa asks a model, and the JSON each answer must be: the openai probe's classification, the factor
completion, its verification, and the question-answer pairs.

Prompts are config templates (`probe.prompt`, `factors.prompt`, `factors.verify_prompt`, `qa.prompt`) with named
fields; a template that names a field the step does not have fails before any request is sent. Each request
ends with the JSON Schema its answer must satisfy (mlprep.llm.ask_json), and the answer is validated against it
(mlprep.llm.schema_check): an answer that is not that JSON is retried, then recorded as `llm_bad_output`.
"""

from __future__ import annotations

import hashlib
import string

from mlprep.failures import REASON_CODES
from mlprep.llm import LLMError, ask_json

SYSTEM = "You are a careful vision-language assistant. Answer only with the JSON object asked for."

FIELDS = {
    "probe.prompt": {"labels"},
    "factors.prompt": {"label", "prediction", "score", "factors"},
    "factors.verify_prompt": {"label", "prediction", "score", "factor", "explanation"},
    "qa.prompt": {"label", "prediction", "factor", "explanation", "k", "n"},
}


def template_fields(template: str) -> set[str]:
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


def check_template(key: str, template: str) -> None:
    """ValueError naming the config key when its template uses a field the step cannot fill."""
    unknown = template_fields(template) - FIELDS[key]
    if unknown:
        raise ValueError(f"probe_qa.{key}: unknown field(s) {', '.join('{' + u + '}' for u in sorted(unknown))}; "
                         f"the fields are {', '.join('{' + f + '}' for f in sorted(FIELDS[key]))}")


def prompt_hash(*templates: str) -> str:
    """Names the prompt version a record came from."""
    text = "\x00".join((SYSTEM, *templates))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def probe_schema(labels: list[str]) -> dict:
    return {"type": "object", "required": ["label", "confidence"], "properties": {
        "label": {"enum": list(labels)}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}


def factor_schema(vocabulary: list[str]) -> dict:
    return {"type": "object", "required": ["factor", "explanation"], "properties": {
        "factor": {"enum": list(vocabulary)}, "explanation": {"type": "string", "minLength": 1}}}


VERIFY_SCHEMA = {"type": "object", "required": ["verified", "reason"], "properties": {
    "verified": {"type": "boolean"}, "reason": {"type": "string"}}}

QA_SCHEMA = {"type": "object", "required": ["question", "answer"], "properties": {
    "question": {"type": "string", "minLength": 1}, "answer": {"type": "string", "minLength": 1}}}


def messages(text: str, schema: dict, image_uri: str | None) -> list[dict]:
    """A chat request: the system line, then the prompt (+ its schema) and the image, if any."""
    content = [{"type": "text", "text": ask_json(text, schema)}]
    if image_uri:
        content.append({"type": "image_url", "image_url": {"url": image_uri}})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def llm_failure_code(err: LLMError) -> str:
    """The failure reason code of a request that failed for good."""
    code = err.code
    if code == "http_429":
        return "llm_rate_limited"
    if code.startswith("http_"):
        return "llm_http_error"
    candidate = f"llm_{code}"
    return candidate if candidate in REASON_CODES else "llm_http_error"
