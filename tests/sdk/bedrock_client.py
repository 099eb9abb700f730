"""An agent using boto3's bedrock-runtime client with placeholder AWS credentials. Configured only by
the environment (HTTPS_PROXY and AWS_CA_BUNDLE), as `keyswap dev` prints them.

usage: bedrock_client.py [--op converse|invoke|both] [--model-id ID] [--region us-east-1]
                         [--access-key-id AKID] [--secret-access-key SECRET] [--session-token TOKEN]
                         [--endpoint-url URL]

Prints one JSON line per operation: {"op", "status", "text", "usage"}. A ClientError prints
{"op", "status", "error", "code"} and exits 3; any other failure exits 4.
"""
import argparse
import json
import sys

KEY = "keyswap-injected-by-proxy"
MODEL_ID = "anthropic.claude-3-5-sonnet-20240620-v1:0"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--op", choices=["converse", "invoke", "both"], default="both")
parser.add_argument("--model-id", default=MODEL_ID)
parser.add_argument("--region", default="us-east-1")
parser.add_argument("--access-key-id", default=KEY)
parser.add_argument("--secret-access-key", default=KEY)
parser.add_argument("--session-token", default=None)
parser.add_argument("--endpoint-url", default=None, help="only for testing without the proxy")
parser.add_argument("--timeout", type=float, default=20)
args = parser.parse_args()

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = boto3.client(
        "bedrock-runtime",
        region_name=args.region,
        aws_access_key_id=args.access_key_id,
        aws_secret_access_key=args.secret_access_key,
        aws_session_token=args.session_token,
        endpoint_url=args.endpoint_url,
        config=Config(
            # SigV4 set in code, so that an AWS_BEARER_TOKEN_BEDROCK in the environment can't switch
            # botocore to bearer auth
            signature_version="v4",
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=args.timeout,
        ),
    )
except Exception as e:
    print(f"bedrock_client: setting up boto3 failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(4)

ops = ["converse", "invoke"] if args.op == "both" else [args.op]
for op in ops:
    try:
        if op == "converse":
            response = client.converse(
                modelId=args.model_id,
                messages=[{"role": "user", "content": [{"text": "hi"}]}],
                inferenceConfig={"maxTokens": 64},
            )
            text = response["output"]["message"]["content"][0]["text"]
            usage = response.get("usage")
        else:
            response = client.invoke_model(
                modelId=args.model_id,
                contentType="application/json",
                accept="application/json",
                body=json.dumps(
                    {
                        "anthropic_version": "bedrock-2023-05-31",
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": "hi"}],
                    }
                ),
            )
            body = json.loads(response["body"].read())
            text = body["content"][0]["text"]
            usage = body.get("usage")
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        print(json.dumps({"op": op, "status": status, "text": text, "usage": usage}), flush=True)
    except ClientError as e:
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        print(json.dumps({"op": op, "status": status, "error": err.get("Message") or str(e), "code": err.get("Code")}), flush=True)
        sys.exit(3)
    except Exception as e:
        print(f"bedrock_client: {op} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(4)
