from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload, context):
    return {"result": f"Hello {payload.get('prompt', 'World')}",
            "session_id": context.session_id}


if __name__ == "__main__":
    app.run()
