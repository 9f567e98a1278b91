"""awscli and boto3 (clients this project did not write) against datapipeline-local."""
import copy
import datetime
import json
import subprocess

import botocore.exceptions
import pytest

from conftest import AK, make_client

DEFINITION = {
    "objects": [
        {"id": "Default", "name": "Default", "workerGroup": "wg-py", "schedule": {"ref": "DailySchedule"}},
        {"id": "DailySchedule", "name": "Every day", "type": "Schedule", "period": "1 day",
         "startAt": "FIRST_ACTIVATION_DATE_TIME", "occurrences": "1"},
        {"id": "Ready", "name": "Ready", "type": "ShellCommandPrecondition", "command": "test -d /"},
        {"id": "First", "name": "First", "type": "ShellCommandActivity",
         "command": "echo #{myGreeting}", "precondition": {"ref": "Ready"}, "maximumRetries": "0"},
        {"id": "Second", "name": "Second", "type": "ShellCommandActivity",
         "command": "echo second", "dependsOn": {"ref": "First"}, "scriptArgument": ["a", "b"]},
    ],
    "parameters": [{"id": "myGreeting", "type": "String", "default": "hello"}],
    "values": {"myGreeting": "hi"},
}


def check_shape(model, shape, value, path="output"):
    """`value` conforms to the botocore `shape`: known members only, required ones present, types."""
    t = shape.type_name
    if t == "structure":
        assert isinstance(value, dict), path
        for k in shape.required_members:
            assert k in value, f"{path}.{k} is required by the model"
        for k, v in value.items():
            if k == "ResponseMetadata":
                continue
            assert k in shape.members, f"{path}.{k} is not in the model"
            check_shape(model, shape.members[k], v, f"{path}.{k}")
    elif t == "list":
        assert isinstance(value, list), path
        for i, v in enumerate(value):
            check_shape(model, shape.member, v, f"{path}[{i}]")
    elif t == "map":
        assert isinstance(value, dict), path
        for k, v in value.items():
            check_shape(model, shape.value, v, f"{path}[{k}]")
    elif t == "string":
        assert isinstance(value, str), path
        if shape.enum:
            assert value in shape.enum, path
    elif t == "boolean":
        assert isinstance(value, bool), path
    elif t == "integer":
        assert isinstance(value, int), path


def call(client, op, **kw):
    out = getattr(client, op)(**kw)
    model = client.meta.service_model
    name = "".join(w.capitalize() for w in op.split("_"))
    om = model.operation_model(name)
    if om.output_shape is not None:
        check_shape(model, om.output_shape, out)
    return out


def aws(env, url, *args):
    r = subprocess.run(
        ["aws", "--endpoint-url", url, "--output", "json", "datapipeline", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, f"aws {' '.join(args)}: {r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip().startswith(("{", "[")) else r.stdout


def fields(obj):
    out = {}
    for f in obj["fields"]:
        out.setdefault(f["key"], []).append(f.get("stringValue", f.get("refValue")))
    return out


def test_awscli_drives_the_management_calls(server, aws_env, tmp_path):
    d = tmp_path / "def.json"
    d.write_text(json.dumps(DEFINITION))
    pid = aws(aws_env, server, "create-pipeline", "--name", "py", "--unique-id", "u1")["pipelineId"]
    # Idempotent on uniqueId.
    assert aws(aws_env, server, "create-pipeline", "--name", "py", "--unique-id", "u1")["pipelineId"] == pid
    put = aws(aws_env, server, "put-pipeline-definition", "--pipeline-id", pid,
              "--pipeline-definition", f"file://{d}", "--parameter-values", "myGreeting=hey")
    assert put["errored"] is False, put
    got = aws(aws_env, server, "get-pipeline-definition", "--pipeline-id", pid)
    assert {o["id"] for o in got["objects"]} == {o["id"] for o in DEFINITION["objects"]}
    assert got["values"] == {"myGreeting": "hey"}
    aws(aws_env, server, "activate-pipeline", "--pipeline-id", pid)
    desc = aws(aws_env, server, "describe-pipelines", "--pipeline-ids", pid)
    state = fields(desc["pipelineDescriptionList"][0])["@pipelineState"]
    assert state == ["SCHEDULED"]
    # list-runs selects on @actualStartTime by default; nothing has started yet, so ask by schedule.
    now = datetime.datetime.now(datetime.timezone.utc)
    window = ",".join((now + datetime.timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%S") for d in (-1, 1))
    runs = aws(aws_env, server, "list-runs", "--pipeline-id", pid, "--schedule-interval", window)
    text = json.dumps(runs)
    assert "@First_" in text and "@Second_" in text, runs
    assert "WAITING_ON_DEPENDENCIES" in text, runs
    q = aws(aws_env, server, "query-objects", "--pipeline-id", pid, "--sphere", "INSTANCE",
            "--objects-query", json.dumps({"selectors": [
                {"fieldName": "@status", "operator": {"type": "EQ", "values": ["WAITING_ON_DEPENDENCIES"]}}]}))
    ids = q["ids"]
    assert sorted(i.split("_")[0] for i in ids) == ["@First", "@Second"], ids
    objs = aws(aws_env, server, "describe-objects", "--pipeline-id", pid, "--object-ids", *ids)
    for o in objs["pipelineObjects"]:
        f = fields(o)
        assert f["@sphere"] == ["INSTANCE"]
        assert f["@componentParent"][0] in ("First", "Second")
    comp = aws(aws_env, server, "describe-objects", "--pipeline-id", pid, "--object-ids", "First",
               "--evaluate-expressions")
    assert fields(comp["pipelineObjects"][0])["type"] == ["ShellCommandActivity"]
    aws(aws_env, server, "set-status", "--pipeline-id", pid, "--object-ids", "First", "--status", "PAUSE")
    comp = aws(aws_env, server, "describe-objects", "--pipeline-id", pid, "--object-ids", "First")
    assert fields(comp["pipelineObjects"][0])["@status"] == ["PAUSED"]
    aws(aws_env, server, "set-status", "--pipeline-id", pid, "--object-ids", "First", "--status", "RESUME")
    second = [i for i in ids if i.startswith("@Second")]
    aws(aws_env, server, "set-status", "--pipeline-id", pid, "--object-ids", *second, "--status", "TRY_CANCEL")
    objs = aws(aws_env, server, "describe-objects", "--pipeline-id", pid, "--object-ids", *second)
    assert fields(objs["pipelineObjects"][0])["@status"] == ["CANCELED"]
    aws(aws_env, server, "add-tags", "--pipeline-id", pid, "--tags", "key=team,value=data")
    desc = aws(aws_env, server, "describe-pipelines", "--pipeline-ids", pid)
    assert desc["pipelineDescriptionList"][0]["tags"] == [{"key": "team", "value": "data"}]
    aws(aws_env, server, "remove-tags", "--pipeline-id", pid, "--tag-keys", "team")
    listed = aws(aws_env, server, "list-pipelines")
    assert {"id": pid, "name": "py"} in listed["pipelineIdList"]
    aws(aws_env, server, "delete-pipeline", "--pipeline-id", pid)
    listed = aws(aws_env, server, "list-pipelines")
    assert pid not in [p["id"] for p in listed["pipelineIdList"]]


def create(client, definition_objects, values=None):
    from awscli.customizations.datapipeline import translator
    pid = call(client, "create_pipeline", name="py", uniqueId="boto")["pipelineId"]
    # The translator consumes what it reads: give it copies.
    objs = translator.definition_to_api_objects({"objects": copy.deepcopy(definition_objects)})
    params = translator.definition_to_api_parameters(copy.deepcopy(DEFINITION))
    vals = translator.definition_to_parameter_values({"values": values or DEFINITION["values"]})
    put = call(client, "put_pipeline_definition", pipelineId=pid, pipelineObjects=objs,
               parameterObjects=params, parameterValues=vals)
    assert put["errored"] is False, put
    call(client, "activate_pipeline", pipelineId=pid)
    return pid


def test_boto3_runs_the_task_runner_calls(client):
    pid = create(client, DEFINITION["objects"])
    # The precondition comes first; the activity waits for it.
    t = call(client, "poll_for_task", workerGroup="wg-py", hostname="py-host")["taskObject"]
    att = t["objects"][t["attemptId"]]
    f = fields(att)
    assert f["type"] == ["ShellCommandPrecondition"], f
    assert f["@sphere"] == ["ATTEMPT"]
    assert "node" in f
    assert call(client, "report_task_progress", taskId=t["taskId"])["canceled"] is False
    call(client, "set_task_status", taskId=t["taskId"], taskStatus="FINISHED")
    t = call(client, "poll_for_task", workerGroup="wg-py", hostname="py-host")["taskObject"]
    f = fields(t["objects"][t["attemptId"]])
    assert f["@componentParent"] == ["First"]
    assert f["workerGroup"] == ["wg-py"], "inherited from Default"
    # Referenced objects travel with the task.
    assert "Ready" in t["objects"] and "DailySchedule" in t["objects"]
    call(client, "report_task_progress", taskId=t["taskId"],
         fields=[{"key": "percentComplete", "stringValue": "50"}])
    # Second depends on First: nothing to hand out until First finishes.
    assert "taskObject" not in call(client, "poll_for_task", workerGroup="wg-py")
    call(client, "set_task_status", taskId=t["taskId"], taskStatus="FINISHED")
    t = call(client, "poll_for_task", workerGroup="wg-py")["taskObject"]
    f = fields(t["objects"][t["attemptId"]])
    assert f["@componentParent"] == ["Second"]
    assert f["scriptArgument"] == ["a", "b"]
    call(client, "report_task_progress", taskId=t["taskId"])
    call(client, "set_task_status", taskId=t["taskId"], taskStatus="FAILED",
         errorId="E1", errorMessage="boom", errorStackTrace="trace")
    hb = call(client, "report_task_runner_heartbeat", taskrunnerId="r1", workerGroup="wg-py", hostname="h")
    assert hb["terminate"] is False
    ids = call(client, "query_objects", pipelineId=pid, sphere="ATTEMPT", query={"selectors": [
        {"fieldName": "@componentParent", "operator": {"type": "REF_EQ", "values": ["Second"]}}]})["ids"]
    objs = call(client, "describe_objects", pipelineId=pid, objectIds=ids)["pipelineObjects"]
    f = fields(objs[0])
    assert f["@status"] == ["FAILED"] and f["errorId"] == ["E1"] and f["errorMessage"] == ["boom"]


def test_precondition_false_keeps_the_activity_from_running(client):
    create(client, DEFINITION["objects"])
    t = call(client, "poll_for_task", workerGroup="wg-py")["taskObject"]
    call(client, "report_task_progress", taskId=t["taskId"])
    call(client, "set_task_status", taskId=t["taskId"], taskStatus="FALSE")
    assert "taskObject" not in call(client, "poll_for_task", workerGroup="wg-py")


def test_boto3_errors_match_the_model(server, client):
    with pytest.raises(botocore.exceptions.ClientError) as e:
        client.describe_pipelines(pipelineIds=["df-DOESNOTEXIST"])
    assert e.value.response["Error"]["Code"] == "PipelineNotFoundException"
    with pytest.raises(client.exceptions.TaskNotFoundException):
        client.report_task_progress(taskId="no-such-task")
    with pytest.raises(client.exceptions.InvalidRequestException):
        client.query_objects(pipelineId="df-x", sphere="NOPE")
    bad = make_client(server, sk="wrong-secret")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.list_pipelines()
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
    unknown = make_client(server, ak="AKIDUNKNOWN")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        unknown.list_pipelines()
    assert e.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_validate_reports_errors_and_warnings(client):
    pid = call(client, "create_pipeline", name="v", uniqueId="v")["pipelineId"]
    objs = [
        {"id": "Default", "name": "Default", "fields": [{"key": "scheduleType", "stringValue": "ondemand"}]},
        {"id": "A", "name": "A", "fields": [
            {"key": "type", "stringValue": "ShellCommandActivity"},
            {"key": "workerGroup", "stringValue": "wg"},
            {"key": "retryDelay", "stringValue": "1 minutes"},
            {"key": "dependsOn", "refValue": "Missing"}]},
    ]
    out = call(client, "validate_pipeline_definition", pipelineId=pid, pipelineObjects=objs)
    assert out["errored"] is True
    errs = {e["id"]: e["errors"] for e in out["validationErrors"]}
    assert any("Missing" in m for m in errs["A"]), errs
    assert any("command" in m for m in errs["A"]), errs
    assert out["validationWarnings"][0]["id"] == "A"
    out = call(client, "put_pipeline_definition", pipelineId=pid, pipelineObjects=objs)
    assert out["errored"] is True
    with pytest.raises(client.exceptions.InvalidRequestException):
        client.get_pipeline_definition(pipelineId=pid)
