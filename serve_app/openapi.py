"""The OpenAPI document of the HTTP API, served at /openapi.json.

Its options are ``RestoreOptions``'s JSON schema, the model every request is validated with, so
the document cannot drift from the code: a new option, bound or default shows here as it is
enforced. The errors are ``serve_app.errors``'s codes, route by route.
"""
from __future__ import annotations

import copy
import functools

from serve_app.api import RestoreOptions
from serve_app.jobs.records import STATUSES
from serve_app.video.pipeline import VideoOutput

_ERROR = {"$ref": "#/components/schemas/Error"}
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff")


def _errors(*statuses: int) -> dict:
    why = {400: "Bad input (invalid_option, empty_image, not_an_image, corrupt_image, url_refused; "
                "for a video job corrupt_video, no_video_stream)",
           401: "No API key, or an unknown one (unauthorized)", 403: "The key lacks the route's scope (forbidden)",
           404: "No such route or job (not_found)", 405: "Another method (method_not_allowed)",
           408: "The body arrived too slowly (body_timeout)", 409: "The job has not succeeded (job_not_done)",
           413: "Too many bytes or pixels, or too much work (too_many_bytes, too_many_pixels, too_much_work, "
                "video_too_long)",
           415: "Not a supported image format (unsupported_format)",
           422: "A job's URL names a host that does not resolve (url_unreachable)",
           429: "The key is past its rate (rate_limited); see Retry-After",
           503: "Overloaded, draining, weights unavailable, a replica lost, the queue unavailable",
           504: "Past the request timeout (timeout)"}
    return {str(s): {"description": why[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


_KEYED = (401, 403, 429)
_BODY = (400, 405, 408, 413, 415, 503)


def _options() -> tuple[dict, dict]:
    """(the options' properties, the named schemas they refer to), from ``RestoreOptions``."""
    schema = RestoreOptions.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema["properties"], schema.get("$defs", {})


def _query(properties: dict, names=None) -> list[dict]:
    return [{"name": name, "in": "query", "required": False, "schema": prop,
             **({"description": prop["description"]} if "description" in prop else {})}
            for name, prop in properties.items() if names is None or name in names]


def _image_bodies(properties: dict, extra: dict | None = None, required: bool = True) -> dict:
    """A request body as the ingress takes it: the raw image, a multipart form, or JSON."""
    fields = {**properties, **(extra or {})}
    image = {"type": "string", "format": "binary"}
    json_body = {"type": "object", "additionalProperties": False,
                 "properties": {"image": {"type": "string", "format": "byte",
                                          "description": "The image, base64"}, **fields}}
    if required:
        json_body["required"] = ["image"]
    form = {"type": "object", "properties": {"image": image, **copy.deepcopy(fields)}}
    content = {t: {"schema": image} for t in ("application/octet-stream", *_IMAGE_TYPES)}
    content["multipart/form-data"] = {"schema": form}
    content["application/json"] = {"schema": json_body}
    return {"required": required, "content": content}


@functools.cache
def openapi() -> dict:
    properties, named = _options()
    restored_image = {t: {"schema": {"type": "string", "format": "binary"}} for t in _IMAGE_TYPES}
    restored_image["application/json"] = {"schema": {"$ref": "#/components/schemas/RestoredJson"}}
    job_fields = {"image_url": {"type": "string", "format": "uri", "description": "An image to fetch instead "
                                "of an upload (public addresses only)"},
                  "webhook": {"type": "string", "format": "uri", "description": "Called, signed, when the job ends"},
                  **VideoOutput.model_json_schema()["properties"]}  # a video's encoder settings
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    job = {"description": "The job", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}
    keyed = [{"bearer": []}]
    paths = {
        "/v1/restore": {"post": {
            "summary": "Restore a picture and answer with it", "operationId": "restore", "security": keyed,
            "parameters": _query(properties), "requestBody": _image_bodies(properties),
            "responses": {"200": {"description": "The restored picture (JSON when the body was JSON)",
                                  "content": restored_image}, **_errors(*_BODY, 504, *_KEYED)}}},
        "/inference": {"post": {
            "summary": "The usual FastAPI wrapper's contract: base64 PNG in, x4 base64 PNG out",
            "operationId": "inference", "security": keyed,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["img_str"], "properties": {
                    "img_str": {"type": "string", "format": "byte"}, "tile": {"type": "integer"},
                    "half": {"type": "boolean"}}}}}},
            "responses": {"200": {"description": "The base64 PNG, as a JSON string",
                                  "content": {"application/json": {"schema": {"type": "string"}}}},
                          **_errors(*_BODY, 504, *_KEYED)}}},
        "/v1/jobs": {
            "post": {"summary": "Queue a job: a picture or a video, uploaded or by image_url",
                     "operationId": "submitJob",
                     "security": keyed,
                     "parameters": [*_query(properties), *_query(job_fields),
                                    {"name": "Idempotency-Key", "in": "header", "required": False,
                                     "schema": {"type": "string", "maxLength": 200}}],
                     "requestBody": _image_bodies(properties, job_fields, required=False),
                     "responses": {"202": job, "200": {**job, "description": "The job made before with "
                                                       "this Idempotency-Key"}, **_errors(*_BODY, 422, *_KEYED)}},
            "get": {"summary": "The caller's jobs, newest first", "operationId": "listJobs", "security": keyed,
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                    "maximum": 1000, "default": 50}}],
                    "responses": {"200": {"description": "A page of jobs", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                            "next_cursor": {"type": ["string", "null"]}}}}}}, **_errors(400, 405, 503, *_KEYED)}}},
        "/v1/jobs/{job_id}": {"get": {"summary": "One job", "operationId": "getJob", "security": keyed,
                                      "parameters": [job_id], "responses": {"200": job, **_errors(404, 405, 503, *_KEYED)}}},
        "/v1/jobs/{job_id}/cancel": {"post": {"summary": "Cancel a job that has not ended", "operationId": "cancelJob",
                                              "security": keyed, "parameters": [job_id],
                                              "responses": {"200": job, **_errors(404, 405, 503, *_KEYED)}}},
        "/v1/jobs/{job_id}/result": {"get": {
            "summary": "A succeeded job's picture (or a redirect to it in S3)", "operationId": "jobResult",
            "security": keyed, "parameters": [job_id],
            "responses": {"200": {"description": "The picture", "content": restored_image},
                          "307": {"description": "A presigned URL of the picture"},
                          **_errors(404, 405, 409, 503, *_KEYED)}}},
        "/v1/models": {"get": {"summary": "Every model, and whether this service offers it and holds its weights",
                               "operationId": "models", "security": keyed,
                               "responses": {"200": {"description": "The models", "content": {"application/json": {
                                   "schema": {"type": "object"}}}}, **_errors(405, *_KEYED)}}},
        "/v1/stats": {"get": {"summary": "What the replicas report of themselves (scope admin)",
                              "operationId": "stats", "security": keyed,
                              "responses": {"200": {"description": "Stats", "content": {"application/json": {
                                  "schema": {"type": "object"}}}}, **_errors(405, 503, *_KEYED)}}},
        "/healthz": {"get": {"summary": "Liveness: 200 while at least one offered model can serve",
                             "operationId": "healthz", "security": [],
                             "responses": {"200": {"description": "Alive"}, "503": {"description": "Nothing can serve"}}}},
        "/readyz": {"get": {"summary": "Readiness: each offered model, loaded or not", "operationId": "readyz",
                            "security": [],
                            "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        "/": {"get": {"summary": "A web page to try the service (it asks for a key where one is needed)",
                      "operationId": "page", "security": [],
                      "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {
                          "type": "string"}}}}}}},
    }
    schemas = {
        **named,
        "Error": {"type": "object", "required": ["error", "detail"],
                  "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}},
        "RestoredJson": {"type": "object", "properties": {
            "image": {"type": "string", "format": "byte"}, "format": {"type": "string"},
            "width": {"type": "integer"}, "height": {"type": "integer"}, "faces": {"type": "integer"}}},
        "Job": {"type": "object", "required": ["id", "status"], "properties": {
            "id": {"type": "string"}, "status": {"type": "string", "enum": list(STATUSES)}}},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "restore-serve", "version": "1",
                     "description": "Real-ESRGAN and GFPGAN restoration on Ray Serve"},
            "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": keyed}
