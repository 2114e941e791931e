"""The run table: filters and sorts by any config key or metric in SQL (SQLite and PostgreSQL), the filter language
refusing hostile input with a 422 that names the position, CSV export of what is shown, and the API over real runs."""

from __future__ import annotations

import csv
import io
import re
import shutil

import pytest
from dashboard_support import Postgres, private_root, serving

from utp_dist.dashboard import filterlang, migrate, runtable
from utp_dist.dashboard.db import Base, Database, Run, RunTag
from utp_dist.dashboard.services import Invalid

# run i (1..12): lr cycles 1e-4, 1e-3, 1e-2; val_acc@1 = i/20; vit on even runs; pretrained on every third; run 12 never evaluated
LRS = (1e-4, 1e-3, 1e-2)


def acc(i: int) -> float | None:
    return None if i == 12 else i / 20


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    postgres = Postgres().start() if request.param == "postgresql" else None
    url = postgres.url if postgres else f"sqlite:///{tmp_path_factory.mktemp('table') / 'db.sqlite'}"
    database = Database(url)
    migrate.upgrade(database.engine)
    with database.sessions() as session:
        runs = [
            Run(source="disk", state="failed" if i % 5 == 0 else "succeeded", name=f"run{i:02d}", created=1000.0 + i) for i in range(1, 13)
        ]
        session.add_all(runs)
        session.flush()
        values = {}
        for i, run in enumerate(runs, start=1):
            found = {"optim.lr": LRS[i % 3], "model.flavour": "vit" if i % 2 == 0 else "resnet", "model.pretrained": i % 3 == 0}
            values[run.id] = found | ({"val_acc@1": acc(i), "test_acc@1": acc(i) - 0.01} if acc(i) is not None else {})
        runtable.store_values(session, values)
        session.add_all(
            [RunTag(run_id=runs[0].id, tag="keep"), RunTag(run_id=runs[3].id, tag="keep"), RunTag(run_id=runs[3].id, tag="odd one")]
        )
        runs[1].display_name = "the baseline"
        session.commit()
        ids = {run.name: run.id for run in runs}
    yield database, ids
    database.engine.dispose()
    if postgres:
        postgres.stop()


def empty_databases(database, folder, *names):
    """New, empty databases on the fixture's backend: files beside nothing for SQLite, databases of the same cluster
    for PostgreSQL."""
    from sqlalchemy import create_engine, text

    db, _ = database
    if db.engine.dialect.name == "sqlite":
        return [create_engine(f"sqlite:///{folder / name}.sqlite") for name in names]
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for name in names:
            connection.execute(text(f"CREATE DATABASE {name}"))
    return [create_engine(db.engine.url.set(database=name)) for name in names]


def test_a_new_database_gets_the_migrated_schema_without_alembic(database, tmp_path, monkeypatch):
    """The server builds a new database from the models and stamps the newest revision (its first start skips Alembic);
    the migrations from an empty database reach the same tables, columns, types, indexes and constraints (and on
    PostgreSQL the same defaults), so the next migration applies to both alike."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    fast, migrated = empty_databases(database, tmp_path, "from_models", "from_migrations")
    config = migrate.alembic_config()
    with migrated.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    def refuse(*args, **kwargs):
        raise AssertionError("Alembic was asked to build a new database")

    monkeypatch.setattr(command, "upgrade", refuse)
    migrate.upgrade(fast)
    for engine in (fast, migrated):
        with engine.connect() as connection:
            # SQLite gives a default back as its SQL text ("''" for ''), which Alembic cannot compare with the model's
            options = {"compare_type": True, "compare_server_default": engine.dialect.name == "postgresql"}
            context = MigrationContext.configure(connection, opts=options)
            assert context.get_current_revision() == migrate.head_revision()
            assert compare_metadata(context, Base.metadata) == [], engine.url
        engine.dispose()


def names(database, **query) -> list[str]:
    db, _ = database
    with db.sessions() as session:
        return [run.name for run in runtable.table(session, **query).runs]


def test_sorted_by_a_metric_missing_values_last(database):
    assert names(database, sort="-val_acc@1") == [f"run{i:02d}" for i in range(11, 0, -1)] + ["run12"]
    assert names(database, sort="val_acc@1")[:2] == ["run01", "run02"] and names(database, sort="val_acc@1")[-1] == "run12"
    assert names(database, sort="model.flavour,-val_acc@1")[:3] == ["run11", "run09", "run07"]  # resnet before vit, then by acc
    assert names(database)[0] == "run12"  # newest first by default


@pytest.mark.parametrize(
    "where, expected",
    [
        ("optim.lr < 0.003 and val_acc@1 > 0.3", [7, 9, 10]),
        ("optim.lr == 0.01 or (model.flavour == 'vit' and not val_acc@1 >= 0.2)", [2, 5, 8, 11, 12]),  # no value is not >= 0.2
        ('model.flavour = "resnet" and val_acc@1 > 0.4', [9, 11]),
        ("model.pretrained == true and state != 'failed'", [3, 6, 9, 12]),
        ("val_acc@1 == null", [12]),
        ("tag == 'keep'", [1, 4]),
        ("tag ~ 'odd' or name ~ 'baseline'", [2, 4]),  # a display name is the run's name in the table
        ("test_acc@1 >= 5.4e-1", [12 - 1]),
        ("id <= 2", [1, 2]),
    ],
)
def test_filter_expressions(database, where, expected):
    assert sorted(names(database, where=where)) == [f"run{i:02d}" for i in expected]


def test_filter_parameters_combine(database):
    assert names(database, tags=["keep"], states=["succeeded"], where="optim.lr > 0.0005") == ["run04", "run01"]
    assert names(database, name="RUN1", sort="run_name") == ["run10", "run11", "run12"]
    db, _ = database
    with db.sessions() as session:
        assert runtable.table(session, where="val_acc@1 > 0.1", limit=2, offset=1).total == 9


@pytest.mark.parametrize(
    "where, says",
    [
        ("__import__('os')", "expected a comparison"),
        ("1; drop table runs", "unexpected character ';' at position 2"),
        ("optim.lr < 0.1; drop table runs", "unexpected character ';' at position 15"),
        ("(optim.lr < 0.1", "expected ')' to close the '(' at position 1"),
        ("optim.lr < 0.1)", "expected 'and', 'or' or the end, found ')' at position 15"),
        ("no.such.key > 1", "unknown column 'no.such.key'"),
        ("state > 3", "state is text"),
        ("val_acc@1 ~ 3", "~ (contains) needs a quoted string"),
        ("name == 'x", "unterminated string"),
        ("optim.lr < 1e999", "is not a finite number"),
        ("(" * 40 + "id == 1" + ")" * 40, "nested deeper than 32"),
        ("tag < 'a'", "tag compares with"),
    ],
)
def test_hostile_or_broken_filters_are_one_line_errors(database, where, says):
    db, _ = database
    with db.sessions() as session, pytest.raises(Invalid) as caught:
        runtable.table(session, where=where)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("where: ") and "position" in str(caught.value)


def test_the_parser_makes_data_not_code():
    tree = filterlang.parse("not (a.b <= -1.5 or c == 'x y') and d != null")
    assert tree == (
        "and",
        ("not", ("or", filterlang.Comparison("a.b", "<=", -1.5, 5), filterlang.Comparison("c", "==", "x y", 20))),
        filterlang.Comparison("d", "!=", None, 36),
    )


def test_unknown_sort_or_column_is_invalid(database):
    db, _ = database
    with db.sessions() as session:
        for query in ({"sort": "-nope"}, {"columns": "optim.lr,nope"}, {"sort": "tag"}, {"columns": "a;b"}):
            with pytest.raises(Invalid):
                runtable.table(session, **query)


def test_csv_is_the_columns_shown(database):
    db, _ = database
    with db.sessions() as session:
        page = runtable.table(session, where="tag == 'keep'", sort="val_acc@1", columns="optim.lr,model.pretrained,val_acc@1")
        rows = list(csv.DictReader(io.StringIO(runtable.to_csv(page))))
    assert list(rows[0]) == [*runtable.DEFAULT_COLUMNS, "optim.lr", "model.pretrained", "val_acc@1", "tags"]
    assert [(r["name"], r["optim.lr"], r["val_acc@1"], r["model.pretrained"], r["tags"]) for r in rows] == [
        ("run01", "0.001", "0.05", "false", "keep"),
        ("run04", "0.001", "0.2", "false", "keep odd one"),
    ]


# --- over HTTP, with runs the indexer read from real run folders


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(private_root(tmp_path_factory, "table-root"), tmp_path_factory, "table-server") as server:
        yield server


def test_the_api_sorts_filters_and_exports_real_runs(server):
    with server.client() as api:
        listed = api.get("/api/v1/runs", params={"where": "train.seed == 2", "columns": "train.seed,val_acc@1,optim.lr"})
        assert listed.status_code == 200 and listed.headers["x-indexing"] == "false"
        (run,) = listed.json()
        assert run["values"]["train.seed"] == 2 and 0 <= run["values"]["val_acc@1"] <= 1 and run["values"]["duration"] > 0
        assert run["best"] == pytest.approx(run["values"]["val_acc@1"])  # the val metrics of the best evaluation
        assert "test_acc@1" in run["values"]
        both = api.get("/api/v1/runs", params={"sort": "-train.seed", "where": "val_acc@1 >= 0", "columns": "train.seed"}).json()
        assert [r["values"]["train.seed"] for r in both] == [2, 1]
        exported = api.get("/api/v1/runs", params={"sort": "train.seed", "columns": "train.seed"}, headers={"Accept": "text/csv"})
        assert exported.headers["content-type"].startswith("text/csv")
        assert [r["train.seed"] for r in csv.DictReader(io.StringIO(exported.text))] == ["1", "2"]
        assert api.get("/api/v1/runs", params={"format": "csv", "limit": 5000}).status_code == 200
        assert api.get("/api/v1/runs", params={"limit": 5000}).status_code == 422  # JSON pages stay at most 500
        columns = api.get("/api/v1/runs/columns").json()
        assert "val_acc@1" in columns["metrics"] and "optim.lr" in columns["config"]
        assert api.get("/api/v1/index").json()["indexing"] is False


@pytest.mark.parametrize("where", ["__import__('os').system('id')", "1; drop table runs", "((state == 'x'", "nope == 1", "\x00"])
def test_the_api_answers_a_bad_filter_with_422(server, where):
    with server.client() as api:
        answer = api.get("/api/v1/runs", params={"where": where})
    assert answer.status_code == 422 and answer.json()["detail"].startswith("where: "), answer.text


def test_tags_notes_and_display_names(server):
    with server.client() as api:
        one, two = (r["id"] for r in api.get("/api/v1/runs", params={"sort": "train.seed", "columns": "train.seed"}).json())
        patched = api.patch(f"/api/v1/runs/{one}", json={"display_name": "seed one", "notes": "the good one", "tags": ["baseline", "keep"]})
        assert (
            patched.status_code == 200 and patched.json()["tags"] == ["baseline", "keep"] and patched.json()["display_name"] == "seed one"
        )
        assert api.patch(f"/api/v1/runs/{one}", json={"remove_tags": ["keep"], "add_tags": ["best"]}).json()["tags"] == ["baseline", "best"]
        assert api.post("/api/v1/runs/tags", json={"run_ids": [one, two, 2**31 - 1], "add": ["seeds"]}).json() == {"runs": 2}
        assert {r["id"] for r in api.get("/api/v1/runs", params={"tag": "seeds"}).json()} == {one, two}
        assert [r["id"] for r in api.get("/api/v1/runs", params={"where": "tag == 'best' or name ~ 'seed one'"}).json()] == [one]
        assert api.get(f"/api/v1/runs/{one}").json()["tags"] == ["baseline", "best", "seeds"]
        assert {"tag": "seeds", "runs": 2} in api.get("/api/v1/runs/tags").json()
        for bad in ({"tags": ["a,b"]}, {"tags": [""]}, {"display_name": "x" * 300}, {"tags": "notalist"}, {"archived": "maybe"}):
            assert api.patch(f"/api/v1/runs/{one}", json=bad).status_code == 422, bad
        assert api.patch("/api/v1/runs/999999", json={"notes": "x"}).status_code == 404
        assert api.patch(f"/api/v1/runs/{one}", json={"display_name": "", "tags": []}).json()["display_name"] is None
        assert api.get(f"/api/v1/runs/{one}").json()["tags"] == []
        # runs found on disk belong to a project: their data set's (output.project would name another)
        projects = {p["name"] for p in api.get("/api/v1/projects").json()}
        assert "shapes" in projects and {r["project"] for r in api.get("/api/v1/runs").json()} == {"shapes"}


def test_clone_with_edits_is_validated_then_queued(server):
    with server.client() as api:
        source = api.get("/api/v1/runs", params={"where": "train.seed == 1", "state": "succeeded"}).json()[0]
        url = f"/api/v1/runs/{source['id']}/clone"
        checked = api.post(url, json={"overrides": {"optim.lr": 0.05, "train.epochs": 1}, "dry_run": True})
        assert checked.status_code == 200, checked.text
        assert checked.json()["changes"]["optim.lr"][1] == 0.05 and "run_id" not in checked.json()
        assert checked.json()["changes"]["output.run_name"][1] is None  # the clone gets a folder of its own
        bad = api.post(url, json={"overrides": {"optim.lrr": 0.05}})
        assert bad.status_code == 422 and "optim.lrr" in bad.json()["detail"] and "\n" not in bad.json()["detail"]
        assert api.post(url, json={"overrides": {"optim.lr": "fast"}}).status_code == 422
        assert api.post(url, json={"overrides": {"model.builder": "os:system"}}).status_code == 422  # no code outside --allow-import
        assert api.post("/api/v1/runs/999999/clone", json={}).status_code == 404
        queued = api.post(url, json={"overrides": {"optim.lr": 0.05}, "priority": 5, "max_attempts": 2})
        assert queued.status_code == 201, queued.text
        run = api.get(f"/api/v1/runs/{queued.json()['run_id']}").json()
        assert run["state"] == "queued" and run["config"]["optim"]["lr"] == 0.05 and run["project_id"] == source["project_id"]
        assert (run["jobs"][0]["priority"], run["jobs"][0]["max_attempts"]) == (5, 2)
        waiting = api.get("/api/v1/runs", params={"where": "optim.lr == 0.05", "state": "queued"}).json()
        assert [r["id"] for r in waiting] == [run["id"]]  # filterable while it waits
        api.post(f"/api/v1/runs/{run['id']}/cancel")


def test_archive_hides_and_delete_removes_files_only_when_confirmed(server):
    root = server.roots[0]
    with server.client() as api:
        source = api.get("/api/v1/runs", params={"where": "train.seed == 1", "state": "succeeded"}).json()[0]
        for kind in ("logs", "checkpoints"):
            shutil.copytree(root / kind / source["dataset"] / source["name"], root / kind / source["dataset"] / "doomed", symlinks=True)
        api.post("/api/v1/index/refresh").raise_for_status()
        (doomed,) = api.get("/api/v1/runs", params={"name": "doomed"}).json()
        assert api.patch(f"/api/v1/runs/{doomed['id']}", json={"archived": True}).status_code == 200
        assert api.get("/api/v1/runs", params={"name": "doomed"}).json() == []
        assert [r["id"] for r in api.get("/api/v1/runs", params={"name": "doomed", "archived": True}).json()] == [doomed["id"]]
        url = f"/api/v1/runs/{doomed['id']}"
        for confirm in ({}, {"confirm": "wrong"}):
            refused = api.delete(url, params={"delete_files": True, **confirm})
            assert refused.status_code == 422 and "confirm" in refused.json()["detail"]
        assert (root / "logs" / source["dataset"] / "doomed").is_dir()
        assert api.delete(url, params={"delete_files": True, "confirm": "doomed"}).status_code == 204
        assert not (root / "logs" / source["dataset"] / "doomed").exists()
        assert not (root / "checkpoints" / source["dataset"] / "doomed").exists()
        assert (root / "logs" / source["dataset"] / source["name"]).is_dir()  # nothing else went
        api.post("/api/v1/index/refresh").raise_for_status()
        assert api.get("/api/v1/runs", params={"name": "doomed", "archived": True}).json() == []  # it does not come back
        project = api.post("/api/v1/projects", json={"name": "to-archive"}).json()
        assert api.patch(f"/api/v1/projects/{project['id']}", json={"archived": True}).json()["archived"] is True
        assert "to-archive" not in {p["name"] for p in api.get("/api/v1/projects").json()}
        assert "to-archive" in {p["name"] for p in api.get("/api/v1/projects", params={"archived": True}).json()}


def test_delete_files_stays_inside_the_roots(tmp_path):
    outside = tmp_path / "elsewhere" / "logs" / "d" / "r"
    outside.mkdir(parents=True)
    run = Run(id=7, root=str(tmp_path / "elsewhere"), dataset="d", name="r")
    with pytest.raises(Invalid, match="not under this dashboard's output roots"):
        runtable.delete_files(run, (tmp_path / "root",))
    root = tmp_path / "root"
    (root / "logs" / "d").mkdir(parents=True)
    (root / "logs" / "d" / "r").symlink_to(outside)  # a link planted in the root
    with pytest.raises(Invalid, match="is a link"):
        runtable.delete_files(Run(id=8, root=str(root), dataset="d", name="r"), (root,))
    escaping = Run(id=9, root=str(root), dataset="..", name="..")
    with pytest.raises(Invalid):
        runtable.delete_files(escaping, (root,))
    assert outside.is_dir() and root.is_dir()


def form_token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_the_web_table_sorts_filters_tags_and_clones(server):
    with server.client(follow_redirects=False) as web:
        page = web.get("/web/runs", params={"columns": "train.seed,optim.lr", "sort": "-train.seed", "where": "val_acc@1 >= 0"})
        assert page.status_code == 200 and "<script>" not in page.text  # static scripts only (the CSP allows no inline one)
        assert 'data-column="train.seed"' in page.text and 'data-column="optim.lr"' in page.text
        seeds = re.findall(r'<a href="/web/runs/(\d+)">#', page.text)
        assert len(seeds) == 2
        assert "format=csv" in page.text and "runtable.js" in page.text
        broken = web.get("/web/runs", params={"where": "optim.lr <"})
        assert broken.status_code == 422 and "where: expected a number" in broken.text
        tagged = web.post("/web/runs/tags", data={"csrf": form_token(page.text), "ids": seeds, "tag": "web-tag", "action": "add"})
        assert tagged.status_code == 303
        assert "web-tag" in web.get("/web/runs", params={"tag": "web-tag"}).text
        assert web.post("/web/runs/tags", data={"ids": seeds, "tag": "x", "action": "add"}).status_code == 403  # no CSRF token
        editor = web.get(f"/web/runs/{seeds[0]}/clone")
        assert editor.status_code == 200 and "clone.js" in editor.text
        check = web.get(f"/web/runs/{seeds[0]}/clone/check", params={"overrides": "optim.lr=0.02\ntrain.epochs=1"}).json()
        assert check["ok"] and check["changes"]["optim.lr"][1] == 0.02
        wrong = web.get(f"/web/runs/{seeds[0]}/clone/check", params={"overrides": "optim.lrr=1"}).json()
        assert not wrong["ok"] and "optim.lrr" in wrong["detail"]
        queued = web.post(
            f"/web/runs/{seeds[0]}/clone", data={"csrf": form_token(editor.text), "overrides": "optim.lr=0.02", "priority": "3"}
        )
        assert queued.status_code == 303
        run_id = queued.headers["location"].rsplit("/", 1)[-1]
        with server.client() as api:
            run = api.get(f"/api/v1/runs/{run_id}").json()
            assert run["config"]["optim"]["lr"] == 0.02 and run["jobs"][0]["priority"] == 3
            api.post(f"/api/v1/runs/{run_id}/cancel")


def test_stored_configs_get_new_versions_descriptions_and_archive(server):
    with server.client() as api:
        project = api.post("/api/v1/projects", json={"name": "versions"}).json()["id"]
        made = api.post(
            "/api/v1/configs", json={"project_id": project, "name": "base", "config": {"optim": {"lr": 0.1}}, "description": "first"}
        )
        assert made.status_code == 201 and made.json()["description"] == "first"
        url = f"/api/v1/configs/{made.json()['id']}/versions"
        v2 = api.post(url, json={"yaml": "optim:\n  lr: 0.01\n"})
        assert v2.status_code == 201 and (v2.json()["name"], v2.json()["description"]) == ("base v2", "first")
        assert api.post(f"/api/v1/configs/{v2.json()['id']}/versions", json={"config": {"optim": {"lr": 1}}}).json()["name"] == "base v3"
        bad = api.post(url, json={"yaml": "optim:\n  lrr: 1\n"})
        assert bad.status_code == 422 and "optim.lrr" in bad.json()["detail"]
        assert api.patch(f"/api/v1/configs/{made.json()['id']}", json={"archived": True, "description": "old"}).json()["archived"] is True
        listed = [c["name"] for c in api.get(f"/api/v1/configs/project/{project}").json()]
        assert listed == ["base v2", "base v3"]
        assert [c["name"] for c in api.get(f"/api/v1/configs/project/{project}", params={"archived": True}).json()] == ["base"]
