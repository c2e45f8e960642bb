"""/openapi.json: a valid OpenAPI 3.1 document made from the schema requests are validated with."""
from openapi_spec_validator import validate

from serve_app.api import RestoreOptions
from serve_app.openapi import openapi
from serve_app.video.pipeline import VideoOutput


def test_the_document_is_valid_openapi():
    validate(openapi())


def test_each_option_is_documented_as_the_code_checks_it():
    document = openapi()
    restore = document["paths"]["/v1/restore"]["post"]
    documented = {p["name"]: p["schema"] for p in restore["parameters"]}
    assert set(documented) == set(RestoreOptions.model_fields)  # an option added to the model shows here
    assert documented == RestoreOptions.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
    assert documented["scale"]["anyOf"][0] == {"exclusiveMinimum": 0, "maximum": 8, "type": "number"}
    # the JSON body takes the same options beside the base64 image; the form too
    for media in ("application/json", "multipart/form-data"):
        body = restore["requestBody"]["content"][media]["schema"]["properties"]
        assert set(body) == {"image", *RestoreOptions.model_fields}, media
    submit = {p["name"] for p in document["paths"]["/v1/jobs"]["post"]["parameters"]}
    assert submit == {*RestoreOptions.model_fields, *VideoOutput.model_fields, "image_url", "webhook",
                      "Idempotency-Key"}


def test_each_keyed_route_documents_the_key_errors_and_health_needs_no_key():
    for path, methods in openapi()["paths"].items():
        for method, operation in methods.items():
            if path in ("/healthz", "/readyz", "/openapi.json", "/"):
                assert operation["security"] == [], path
            else:
                assert operation["security"] == [{"bearer": []}], path
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)
