"""Label conventions of the project and of the sources it reads (no TensorFlow).

The project's labels are the original's: **female = 0, male = 1**, and the
prediction is male when p(male) >= 0.5. Every other convention met in the
wild is translated here, in one place:

* folder names of a raw folder set (`SPLIT_ALIASES`, `CLASS_ALIASES`);
* label values in CSV files: male|female|m|f|man|woman|1|0 (`parse_label`),
  and the names of their columns (`csv_columns`);
* UTKFace file names, whose gender digit is 0 = male, 1 = female (`utkface_label`);
* CelebA's `Male` attribute, +1 / -1 (`celeba_label`), and its evaluation
  partition 0/1/2 = train/validation/test (`CELEBA_PARTITIONS`).
"""

from typing import Dict, Optional, Sequence

FEMALE, MALE = 0, 1
CLASS_NAMES = ('female', 'male')     # Indexed by label.
SPLITS = ('train', 'validation', 'test')

SPLIT_ALIASES = {
    'train': ('train', 'training'),
    'validation': ('validation', 'valid', 'val'),
    'test': ('test', 'testing'),
}
CLASS_ALIASES = {
    'female': ('female', 'woman', 'women'),
    'male': ('male', 'man', 'men'),
}
LABEL_VALUES = {'0': FEMALE, '1': MALE, 'female': FEMALE, 'male': MALE,
                'f': FEMALE, 'm': MALE, 'woman': FEMALE, 'man': MALE}
UTKFACE_GENDERS = {'0': MALE, '1': FEMALE}
CELEBA_MALE = {'1': MALE, '-1': FEMALE}
CELEBA_PARTITIONS = {'0': 'train', '1': 'validation', '2': 'test'}
# Column names of a labels CSV's header (any case; the first present wins).
CSV_COLUMNS = {
    'path': ('path', 'file', 'filename', 'image'),           # An image file.
    'folder': ('folder', 'directory', 'identity', 'class_id'),  # Its images.
    'label': ('label', 'gender', 'sex'),
    'split': ('split', 'partition', 'subset'),
}


def match_alias(name: str, aliases: dict) -> Optional[str]:
  """The canonical name whose aliases include `name` (any case), or None."""
  for canonical, names in aliases.items():
    if name.lower() in names:
      return canonical
  return None


def csv_columns(header: Sequence[str]) -> Dict[str, Optional[int]]:
  """{'path', 'folder', 'label', 'split'}: each one's index in a CSV header
  row (`CSV_COLUMNS`), or None. VGGFace2's identity_meta.csv (Class_ID,
  Gender) and FairFace's label files (file, gender) name theirs so; other
  columns are for the caller to ignore.
  """
  names = [h.strip().lower() for h in header]
  return {key: next((names.index(c) for c in choices if c in names), None)
          for key, choices in CSV_COLUMNS.items()}


def parse_label(value: str) -> int:
  """0/1, female/male, f/m, woman/man (any case) -> 0/1; ValueError otherwise."""
  key = value.strip().lower()
  if key not in LABEL_VALUES:
    raise ValueError(f'label {value!r}: expected male|female|1|0 (or m/f, '
                     'man/woman)')
  return LABEL_VALUES[key]


def utkface_label(gender_digit: str) -> int:
  """UTKFace's gender field (0 = male, 1 = female) -> the project's label."""
  if gender_digit not in UTKFACE_GENDERS:
    raise ValueError(f'UTKFace gender {gender_digit!r}: expected 0 (male) or '
                     '1 (female)')
  return UTKFACE_GENDERS[gender_digit]


def celeba_label(male_attribute: str) -> int:
  """CelebA's `Male` attribute (1 / -1) -> the project's label."""
  if male_attribute not in CELEBA_MALE:
    raise ValueError(f'CelebA Male attribute {male_attribute!r}: expected 1 '
                     'or -1')
  return CELEBA_MALE[male_attribute]
