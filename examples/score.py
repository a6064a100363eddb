"""Score card transactions for fraud through the infermesh gateway with the stock Triton client.

    python -m examples.score --url 127.0.0.1:8001 --user u42 --merchant m7 --amount 129.99
The API key is read from $INFERMESH_API_KEY. With --ca (a gateway serving TLS, e.g. `TLS=1 make run`) the call
goes over TLS and the gateway's certificate is verified against that CA.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import tritonclient.grpc as grpcclient


def score(url: str, api_key: str, users: list[str], merchants: list[str], amounts: list[float], ca: str | None = None):
    client = (
        grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca)
        if ca
        else grpcclient.InferenceServerClient(url)
    )
    inputs = [
        grpcclient.InferInput("user_id", [len(users)], "BYTES"),
        grpcclient.InferInput("merchant_id", [len(merchants)], "BYTES"),
        grpcclient.InferInput("amount", [len(amounts)], "FP32"),
    ]
    inputs[0].set_data_from_numpy(np.array([u.encode() for u in users], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([m.encode() for m in merchants], dtype=np.object_))
    inputs[2].set_data_from_numpy(np.array(amounts, dtype=np.float32))
    result = client.infer("fraud", inputs, headers={"authorization": f"Bearer {api_key}"}, client_timeout=5.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--user", action="append", required=True)
    parser.add_argument("--merchant", action="append", required=True)
    parser.add_argument("--amount", action="append", type=float, required=True)
    parser.add_argument("--ca", help="PEM CA of the gateway's certificate: call over TLS")
    args = parser.parse_args()
    api_key = os.environ.get("INFERMESH_API_KEY", "")
    result = score(args.url, api_key, args.user, args.merchant, args.amount, args.ca)
    probabilities = result.as_numpy("fraud_probability")
    response = result.get_response()
    print(f"model fraud version {response.model_version}")
    for user, merchant, amount, p in zip(args.user, args.merchant, args.amount, probabilities, strict=True):
        print(f"  {user} at {merchant} for {amount:.2f}: fraud probability {p:.4f}")
    if "infermesh_defaulted_entities" in response.parameters:
        print(f"  unknown entities, defaults used: {response.parameters['infermesh_defaulted_entities'].string_param}")


if __name__ == "__main__":
    main()
