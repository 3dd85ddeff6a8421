"""CTCAE v5.0 terms that a psoriasis trial of UC-MSC infusions against methotrexate reports most,
each with its MedDRA system organ class: how the SDTM AE domain codes a reported term.

`code(term)` matches a reported term to a CTCAE v5.0 term, ignoring case and runs of whitespace
(and knows a few common synonyms: "pyrexia" is "Fever", "ALT increased" is "Alanine
aminotransferase increased", "pneumonia" is "Lung infection", CTCAE v5.0 having no "Pneumonia").
It answers `(decod, soc)`: the CTCAE term as CTCAE spells it and the system organ class CTCAE
files it under (CTCAE groups its terms by MedDRA primary SOC, so this is AEBODSYS and AESOC).

A term it does not know is not guessed at: `code` answers None, and the AE domain leaves AEDECOD
empty and puts AEBODSYS = "UNCODED" (`UNCODED`), so that the record shows up as one a coder must
still code. (Both AEDECOD and AEBODSYS need a value in a submission: uncoded records are work
left, not a result.)

A CTCAE term is a MedDRA lowest level term; it is usually, not always, its own preferred term
("Fever" is the PT "Pyrexia", "Mucositis oral" the PT "Stomatitis", "Anemia" the PT "Anaemia").
Where a submission needs MedDRA preferred terms and codes, this table is the place to put them:
the codes are MedDRA's, under its licence, and are not in this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

UNCODED = "UNCODED"

BLOOD = "Blood and lymphatic system disorders"
CARDIAC = "Cardiac disorders"
GASTRO = "Gastrointestinal disorders"
GENERAL = "General disorders and administration site conditions"
HEPATO = "Hepatobiliary disorders"
IMMUNE = "Immune system disorders"
INFECTIONS = "Infections and infestations"
INJURY = "Injury, poisoning and procedural complications"
INVESTIGATIONS = "Investigations"
METABOLISM = "Metabolism and nutrition disorders"
MUSCULOSKELETAL = "Musculoskeletal and connective tissue disorders"
NERVOUS = "Nervous system disorders"
PSYCHIATRIC = "Psychiatric disorders"
RENAL = "Renal and urinary disorders"
RESPIRATORY = "Respiratory, thoracic and mediastinal disorders"
SKIN = "Skin and subcutaneous tissue disorders"
VASCULAR = "Vascular disorders"

_BY_SOC: dict[str, tuple[str, ...]] = {
    BLOOD: ("Anemia", "Febrile neutropenia", "Leukocytosis"),
    CARDIAC: ("Sinus tachycardia", "Sinus bradycardia", "Palpitations", "Chest pain - cardiac",
              "Myocardial infarction", "Cardiac arrest"),
    GASTRO: ("Nausea", "Vomiting", "Diarrhea", "Abdominal pain", "Constipation", "Dyspepsia",
             "Mucositis oral", "Dry mouth", "Pancreatitis"),
    GENERAL: ("Fever", "Chills", "Fatigue", "Malaise", "Flu like symptoms", "Pain",
              "Edema limbs", "Edema face", "Localized edema", "Non-cardiac chest pain",
              "Injection site reaction", "Infusion site extravasation", "Multi-organ failure",
              "Death NOS", "Sudden death NOS"),
    HEPATO: ("Hepatic failure",),
    IMMUNE: ("Allergic reaction", "Anaphylaxis", "Cytokine release syndrome", "Serum sickness",
             "Autoimmune disorder"),
    INFECTIONS: ("Upper respiratory infection", "Lung infection", "Sepsis",
                 "Urinary tract infection", "Skin infection", "Sinusitis", "Pharyngitis",
                 "Bronchial infection", "Catheter related infection", "Shingles",
                 "Hepatitis B reactivation", "Hepatitis viral", "Thrush"),
    INJURY: ("Infusion related reaction",),
    INVESTIGATIONS: ("Alanine aminotransferase increased", "Aspartate aminotransferase increased",
                     "Blood bilirubin increased", "Alkaline phosphatase increased",
                     "GGT increased", "Creatinine increased", "Neutrophil count decreased",
                     "White blood cell decreased", "Platelet count decreased",
                     "Lymphocyte count decreased", "Weight loss", "Weight gain"),
    METABOLISM: ("Anorexia", "Hyperglycemia", "Hyperuricemia"),
    MUSCULOSKELETAL: ("Arthralgia", "Myalgia", "Back pain", "Pain in extremity"),
    NERVOUS: ("Headache", "Dizziness", "Dysgeusia", "Paresthesia", "Syncope", "Somnolence",
              "Seizure", "Stroke", "Peripheral sensory neuropathy"),
    PSYCHIATRIC: ("Insomnia", "Depression", "Anxiety"),
    RENAL: ("Acute kidney injury", "Proteinuria"),
    RESPIRATORY: ("Cough", "Dyspnea", "Pneumonitis", "Pulmonary fibrosis", "Hypoxia",
                  "Bronchospasm", "Epistaxis", "Sore throat", "Allergic rhinitis"),
    SKIN: ("Rash maculo-papular", "Rash acneiform", "Pruritus", "Alopecia", "Urticaria",
           "Dry skin", "Erythema multiforme", "Photosensitivity", "Hyperhidrosis",
           "Skin ulceration", "Skin hyperpigmentation", "Stevens-Johnson syndrome",
           "Toxic epidermal necrolysis"),
    VASCULAR: ("Hypertension", "Hypotension", "Flushing", "Hot flashes", "Thromboembolic event"),
}

# Every CTCAE v5.0 term of the table, as CTCAE spells it, with its system organ class.
TERMS: Mapping[str, str] = MappingProxyType(
    {term: soc for soc, terms in _BY_SOC.items() for term in terms})

# What sites write for a CTCAE term, and the term it is.
SYNONYMS: Mapping[str, str] = MappingProxyType({
    "pyrexia": "Fever",
    "alt increased": "Alanine aminotransferase increased",
    "alt elevated": "Alanine aminotransferase increased",
    "elevated alt": "Alanine aminotransferase increased",
    "ast increased": "Aspartate aminotransferase increased",
    "ast elevated": "Aspartate aminotransferase increased",
    "elevated ast": "Aspartate aminotransferase increased",
    "bilirubin increased": "Blood bilirubin increased",
    "hyperbilirubinemia": "Blood bilirubin increased",
    "neutropenia": "Neutrophil count decreased",
    "leukopenia": "White blood cell decreased",
    "thrombocytopenia": "Platelet count decreased",
    "lymphopenia": "Lymphocyte count decreased",
    "upper respiratory tract infection": "Upper respiratory infection",
    "uri": "Upper respiratory infection",
    "urti": "Upper respiratory infection",
    "pneumonia": "Lung infection",
    "herpes zoster": "Shingles",
    "stomatitis": "Mucositis oral",
    "oral mucositis": "Mucositis oral",
    "rash maculopapular": "Rash maculo-papular",
    "maculopapular rash": "Rash maculo-papular",
    "itching": "Pruritus",
    "hair loss": "Alopecia",
    "hypersensitivity": "Allergic reaction",
    "anaphylactic reaction": "Anaphylaxis",
    "infusion reaction": "Infusion related reaction",
    "infusion-related reaction": "Infusion related reaction",
    "crs": "Cytokine release syndrome",
    "liver failure": "Hepatic failure",
    "death": "Death NOS",
    "sudden death": "Sudden death NOS",
    "high blood pressure": "Hypertension",
    "low blood pressure": "Hypotension",
    "loss of appetite": "Anorexia",
    "tiredness": "Fatigue",
    "diarrhoea": "Diarrhea",
    "anaemia": "Anemia",
})


def _key(text: str) -> str:
    """A term as matched: case folded, whitespace runs made one space, no space around it."""
    return " ".join(text.casefold().split())


_INDEX: Mapping[str, str] = MappingProxyType({
    **{_key(term): term for term in TERMS},
    **{_key(synonym): term for synonym, term in SYNONYMS.items()},
})


def code(term: str) -> tuple[str, str] | None:
    """The CTCAE v5.0 term a reported term is, and its system organ class; None if not known."""
    found = _INDEX.get(_key(term))
    return None if found is None else (found, TERMS[found])
