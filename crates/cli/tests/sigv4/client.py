"""boto3 side of crates/cli/tests/sigv4.rs: an unmodified AWS SDK client.

Usage: client.py SCENARIO URL ACCESS_KEY_ID SECRET ARN SESSION_ID
Prints one JSON object describing what happened.
"""
import datetime
import json
import sys
import unittest.mock

import boto3
import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

PAYLOAD = b'{"prompt":"hi"}'


def client(url, akid, secret):
    return boto3.client(
        "bedrock-agentcore",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}),
    )


def error(e):
    return {
        "error": e.response["Error"].get("Code"),
        "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
    }


def flow(url, akid, secret, arn, sid):
    """Invoke, stop, stop again: the happy path of the AgentCore API."""
    c = client(url, akid, secret)
    r = c.invoke_agent_runtime(
        agentRuntimeArn=arn, runtimeSessionId=sid, payload=PAYLOAD, qualifier="DEFAULT"
    )
    out = {
        "status": r["statusCode"],
        "session": r.get("runtimeSessionId"),
        "body": r["response"].read().decode(),
    }
    s = c.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=sid, qualifier="DEFAULT")
    out["stop"] = {"status": s["statusCode"], "session": s.get("runtimeSessionId")}
    try:
        c.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=sid, qualifier="DEFAULT")
        out["second_stop"] = {"error": None}
    except ClientError as e:
        out["second_stop"] = error(e)
    return out


def invoke(url, akid, secret, arn, sid):
    """One invocation; used with a wrong secret, where it must fail."""
    try:
        r = client(url, akid, secret).invoke_agent_runtime(
            agentRuntimeArn=arn, runtimeSessionId=sid, payload=PAYLOAD
        )
        return {"status": r["statusCode"], "body": r["response"].read().decode()}
    except ClientError as e:
        return error(e)


def signed(url, akid, secret, arn, sid, skew_s=0):
    """A request signed by botocore (optionally with a clock skew_s off),
    returned for the Rust side to send raw: once, twice, or altered."""
    from urllib.parse import quote

    target = f"{url}/runtimes/{quote(arn, safe='')}/invocations?qualifier=DEFAULT"
    req = AWSRequest(
        method="POST",
        url=target,
        data=PAYLOAD,
        headers={
            "Content-Type": "application/json",
            "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid,
        },
    )
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    at = now + datetime.timedelta(seconds=skew_s)
    with unittest.mock.patch.object(botocore.auth, "get_current_datetime", return_value=at):
        SigV4Auth(Credentials(akid, secret), "bedrock-agentcore", "us-east-1").add_auth(req)
    return {"url": target, "headers": dict(req.headers), "body": PAYLOAD.decode()}


def main():
    scenario, url, akid, secret, arn, sid = sys.argv[1:7]
    if scenario == "flow":
        out = flow(url, akid, secret, arn, sid)
    elif scenario == "invoke":
        out = invoke(url, akid, secret, arn, sid)
    elif scenario == "signed":
        out = signed(url, akid, secret, arn, sid)
    elif scenario == "signed-stale":
        out = signed(url, akid, secret, arn, sid, skew_s=-600)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
