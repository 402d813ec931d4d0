from tests.test_aggregate import *  # noqa: F403
from tests.test_aggregate import exact, weights, param, HYPERTENSION, SNOMED, count

def test_scratch(app, project, small_world):
    body = weights("quantile", "latest", 0, 200, param("q", 0.5))
    body["parameter"].append(param("cohort", f"Condition?code={SNOMED}|{HYPERTENSION}"))
    print("values", exact(app, project, body).values)
    body = weights("sum", "count", 0, 5)
    body["parameter"].append(param("cohort", f"Condition?code={SNOMED}|{HYPERTENSION}"))
    print("sum count", exact(app, project, body))
    body = weights("mean", "latest", 0, 200)
    body["parameter"].append(param("cohort", "Patient?gender=female"))
    print("mean female", exact(app, project, body))
