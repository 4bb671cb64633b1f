"""`aws` for the workflow tests: the real AWS CLI (awscli's own driver: argument parsing,
shorthand syntax, file:// inputs, --query, and botocore's parameter validation) with only the
HTTP call to AWS Batch replaced by a canned success response. Every call's API parameters
are appended as a JSON line to $KILN_AWS_CAPTURE.

Run as `python tests/servers/aws_capture.py batch submit-job ...`.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

ACCOUNT = "123456789012"
REGION = "us-east-1"


def _response(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    if operation == "RegisterJobDefinition":
        name = params["jobDefinitionName"]
        return {
            "jobDefinitionName": name,
            "jobDefinitionArn": f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/{name}:1",
            "revision": 1,
        }
    if operation == "SubmitJob":
        job_id = str(uuid.uuid4())
        return {
            "jobName": params["jobName"],
            "jobId": job_id,
            "jobArn": f"arn:aws:batch:{REGION}:{ACCOUNT}:job/{job_id}",
        }
    raise SystemExit(f"aws_capture: no canned response for {operation}")


def main(argv: list[str]) -> int:
    from awscli.clidriver import create_clidriver
    from botocore.awsrequest import AWSResponse

    capture = os.environ["KILN_AWS_CAPTURE"]
    driver = create_clidriver()
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        calls.append((model.name, json.loads(json.dumps(params))))

    def respond(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        operation, params = calls[-1]
        assert operation == model.name
        with open(capture, "a") as f:
            f.write(json.dumps({"operation": operation, "params": params}) + "\n")
        http = AWSResponse(f"https://batch.{REGION}.amazonaws.com/", 200, {}, None)
        return http, {**_response(operation, params), "ResponseMetadata": {"HTTPStatusCode": 200}}

    # before-parameter-build sees the API parameters; botocore validates them next; then
    # before-call may answer instead of sending the request.
    driver.session.register("before-parameter-build.batch", record)
    driver.session.register("before-call.batch", respond)
    return driver.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
