"""What each event publishes to Kafka (`EventData.published`): a screening without its number and
its failing criteria, every other event itself (issue 14, D51)."""

from __future__ import annotations

import pytest

from shared.events import (
    CATALOGUE,
    ENROLLMENT,
    PatientScreened,
    Reason,
    catalogue_document,
    parse_data,
)
from tests.unit.test_events import SAMPLES


def _failed_screening() -> PatientScreened:
    sample, _ = SAMPLES["PatientScreened"]
    assert isinstance(sample, PatientScreened)
    return sample.model_copy(update={
        "screening_number": "S1-0042",
        "reasons": (Reason(criterion="EXC-HIV-HBV-HCV", message="HIV, HBV or HCV"),
                    Reason(criterion="EXC-PREGNANCY", message="pregnant or lactating"))})


def test_a_screening_publishes_neither_its_number_nor_its_failing_criteria() -> None:
    screened = _failed_screening()
    published = screened.published()
    assert type(published) is PatientScreened
    assert published.screening_number is None and published.reasons == ()
    wire = published.model_dump(mode="json")
    assert wire["screening_number"] is None and wire["reasons"] == []
    text = published.model_dump_json()
    assert "S1-0042" not in text and "HIV" not in text and "EXC-" not in text
    # Everything else is the screening's, and the published form is a valid PatientScreened.
    assert published.model_dump(exclude={"screening_number", "reasons"}) == screened.model_dump(
        exclude={"screening_number", "reasons"})
    assert published.eligible is False and published.subject() == screened.subject()
    assert parse_data("PatientScreened", wire) == published
    # The event itself is unchanged: the store keeps it whole.
    assert screened.screening_number == "S1-0042" and len(screened.reasons) == 2


def test_an_eligible_screening_keeps_eligible_and_its_baseline() -> None:
    sample, _ = SAMPLES["PatientScreened"]
    eligible = sample.model_copy(update={"eligible": True, "reasons": (), "sex": "female",
                                         "bsa_percent": 12.0, "dlqi": 11})
    published = eligible.published()
    assert isinstance(published, PatientScreened)
    assert published.eligible is True and published.screening_number is None
    assert (published.age_years, published.sex, published.pasi, published.bsa_percent,
            published.dlqi) == (17, "female", 14.2, 12.0, 11)


@pytest.mark.parametrize("name", sorted(set(CATALOGUE) - {"PatientScreened"}))
def test_every_other_event_publishes_itself(name: str) -> None:
    sample, _ = SAMPLES[name]
    assert sample.published() is sample


def test_no_other_event_on_enrollment_carries_a_screening_number_or_criteria() -> None:
    """Checked when PatientScreened got its published form: whoever adds such a field to an
    enrolment event gives that event a `published` too, and lists it here."""
    for name, cls in CATALOGUE.items():
        if ENROLLMENT in cls.topics() and name != "PatientScreened":
            assert not {"screening_number", "reasons", "criterion"} & set(cls.model_fields), name


def test_the_published_schema_says_what_is_never_published() -> None:
    data = catalogue_document()["events"]["PatientScreened"]["data"]
    for field in ("screening_number", "reasons"):
        assert "never published" in data["properties"][field]["description"], field
        assert field not in data["required"], field
