"""Tests for gender_jax.sources: each source kind, specs and the hash split.

Sources list files and read labels; nothing is decoded, so the generated
"images" are a few distinct bytes each.
"""

import collections
import hashlib
import os

import numpy as np
import pytest

from gender_jax import errors
from gender_jax import labels
from gender_jax import sources


def _touch(path, content=None):
  """Writes `content` (default: the path's own bytes, so files differ)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(os.fsencode(path) if content is None else content)
  return path


def _bytes_in(split, val_fraction=0.1, test_fraction=0.1, skip=0):
  """Some bytes whose content hash puts a file in `split` (the `skip`+1-th
  such string of '0', '1', ...)."""
  for i in range(10000):
    data = str(i).encode()
    digest = hashlib.sha256(data).hexdigest()
    if sources.hash_split(digest, val_fraction, test_fraction) == split:
      if not skip:
        return data
      skip -= 1
  raise AssertionError(split)


def _labelled(source):
  return {os.path.basename(i.path): (i.label, i.split) for i in source.items}


def _one_line(error):
  assert isinstance(error.value, errors.UserError)
  assert '\n' not in str(error.value), str(error.value)


# --------------------------------------------------------------- specs --


@pytest.mark.parametrize('spec,want', [
    ('utkface:/data/UTKFace', (None, 'utkface', '/data/UTKFace')),
    ('web=csv:list.csv', ('web', 'csv', 'list.csv')),
    ('folders:C:/x', (None, 'folders', 'C:/x')),
])
def test_parse_spec(spec, want):
  assert sources.parse_spec(spec) == want


@pytest.mark.parametrize('spec,words', [
    ('/data/UTKFace', ['KIND:PATH', 'folders|utkface|celeba|csv']),
    ('imdb:/data', ['imdb']),
    ('csv:', ['KIND:PATH']),
    ('Web=csv:a.csv', ["'Web'", 'lower-case']),
])
def test_bad_spec_is_one_line_layout_error(spec, words):
  with pytest.raises(sources.LayoutError) as error:
    sources.parse_spec(spec)
  _one_line(error)
  for word in words:
    assert word in str(error.value)


def test_source_names_default_to_kind_and_never_collide():
  specs = [(None, 'folders', 'a'), (None, 'utkface', 'b'),
           (None, 'folders', 'c'), ('folders3', 'csv', 'd')]
  assert sources.source_names(specs) == ['folders', 'utkface', 'folders2',
                                         'folders3']
  with pytest.raises(sources.LayoutError, match="named 'web'") as error:
    sources.source_names([('web', 'csv', 'a'), ('web', 'csv', 'b')])
  _one_line(error)


# -------------------------------------------------------------- folders --


def test_folders_with_aliases(tmp_path):
  for rel in ('training/WOMAN/a.jpg', 'training/man/b.jpg',
              'training/man/c.jpg', 'Val/Female/d.jpg', 'Val/Male/e.jpg',
              'Testing/women/f.jpg', 'Testing/Men/g.jpg',
              'Testing/Men/.hidden.jpg'):
    _touch(str(tmp_path / rel))
  source = sources.read_source('folders', str(tmp_path))
  assert source.name == 'folders' and source.skipped == []
  assert _labelled(source) == {
      'a.jpg': (0, 'train'), 'b.jpg': (1, 'train'), 'c.jpg': (1, 'train'),
      'd.jpg': (0, 'validation'), 'e.jpg': (1, 'validation'),
      'f.jpg': (0, 'test'), 'g.jpg': (1, 'test')}
  assert sources.counts(source.items) == {
      'train': {'female': 1, 'male': 2},
      'validation': {'female': 1, 'male': 1},
      'test': {'female': 1, 'male': 1}}


def test_folders_layout_errors_name_the_path(tmp_path):
  _touch(str(tmp_path / 'Train' / 'Male' / 'a.jpg'))
  with pytest.raises(sources.LayoutError) as error:
    sources.read_source('folders', str(tmp_path))
  assert str(tmp_path) in str(error.value)
  assert 'no validation folder' in str(error.value)
  # The layout is appended on purpose; the scripts print it as one line.
  assert 'Expected layout' in str(error.value)


# -------------------------------------------------------------- utkface --


def test_utkface_labels_from_names_and_skips_malformed(tmp_path):
  good = {'25_0_0_20170116174525125.jpg.chip.jpg': labels.MALE,
          '3_1_2_20161219140525218.jpg.chip.jpg': labels.FEMALE,
          '101_0_4_20170112213500903.jpg.chip.jpg': labels.MALE,
          '38_0_1_201701162330572788.jpg.chip.jpg': labels.MALE}
  bad = {'61_1_20170109142408075.jpg.chip.jpg': 'not a UTKFace name',
         '39_2_1_20170116174525125.jpg.chip.jpg': "UTKFace gender '2'",
         '55_0_0_20170116232725357jpg.chip.jpg': 'not a UTKFace name',
         'notes.txt': 'not a UTKFace name'}
  for i, name in enumerate(list(good) + list(bad)):
    _touch(str(tmp_path / name), _bytes_in(('train', 'validation')[i % 2],
                                           skip=i))
  _touch(str(tmp_path / '.DS_Store'))
  (tmp_path / 'sub').mkdir()
  source = sources.read_source('utkface', str(tmp_path))
  assert _labelled(source) == {n: (y, ('train', 'validation')[i % 2])
                               for i, (n, y) in enumerate(good.items())}
  skipped = {os.path.basename(p): reason for p, reason in source.skipped}
  assert set(skipped) == set(bad)
  for name, reason in bad.items():
    assert reason in skipped[name] and '\n' not in skipped[name]


def test_utkface_item_gender_convention():
  assert sources.utkface_item('/x/1_0_0_20170101000000000.jpg.chip.jpg'
                              ).label == labels.MALE == 1
  assert sources.utkface_item('/x/1_1_0_20170101000000000.jpg.chip.jpg'
                              ).label == labels.FEMALE == 0


# --------------------------------------------------------------- celeba --


_CELEBA_FILES = [('000001.jpg', '-1', '0'), ('000002.jpg', '1', '0'),
                 ('000003.jpg', '1', '1'), ('000004.jpg', '-1', '1'),
                 ('000005.jpg', '-1', '2'), ('000006.jpg', '1', '2')]


def _celeba(root, layout='flat', extra_rows=()):
  """CelebA's release files under `root` ('flat' or 'Img/Anno/Eval')."""
  img, anno, ev = (('img_align_celeba', '', '') if layout == 'flat' else
                   ('Img/img_align_celeba', 'Anno', 'Eval'))
  for name, _, _ in _CELEBA_FILES:
    _touch(os.path.join(root, img, name))
  names = ['5_o_Clock_Shadow', 'Arched_Eyebrows', 'Male', 'Young']
  rows = [f'{len(_CELEBA_FILES)}', ' '.join(names)]
  rows += [f'{n}  -1 1 {male}  1' for n, male, _ in _CELEBA_FILES]
  rows += list(extra_rows)
  _touch(os.path.join(root, anno, 'list_attr_celeba.txt'),
         ('\n'.join(rows) + '\n').encode())
  _touch(os.path.join(root, ev, 'list_eval_partition.txt'),
         ''.join(f'{n} {p}\n' for n, _, p in _CELEBA_FILES).encode())
  return os.path.join(root, img)


@pytest.mark.parametrize('layout', ['flat', 'Img/Anno/Eval'])
def test_celeba_male_attribute_and_partition(tmp_path, layout):
  images = _celeba(str(tmp_path), layout)
  source = sources.read_source('celeba', str(tmp_path))
  assert source.skipped == []
  assert _labelled(source) == {
      n: (int(male == '1'), labels.CELEBA_PARTITIONS[p])
      for n, male, p in _CELEBA_FILES}
  assert all(os.path.dirname(i.path) == images for i in source.items)


def test_celeba_bad_rows_are_skipped_with_line_numbers(tmp_path):
  _celeba(str(tmp_path), extra_rows=['000007.jpg -1 1 0 1',     # Male = 0.
                                     '000008.jpg -1 1',         # Too short.
                                     '000009.jpg -1 1 1 1'])    # No partition.
  source = sources.read_source('celeba', str(tmp_path))
  assert len(source.items) == len(_CELEBA_FILES)
  skipped = {os.path.basename(p): r for p, r in source.skipped}
  assert skipped['000007.jpg'].startswith('list_attr_celeba.txt line 9: ')
  assert "Male attribute '0'" in skipped['000007.jpg']
  assert skipped['000008.jpg'].startswith('list_attr_celeba.txt line 10: 2 ')
  assert skipped['000009.jpg'] == ('list_attr_celeba.txt line 11: not in '
                                   'list_eval_partition.txt')


@pytest.mark.parametrize('case', ['no_attrs', 'no_male_column',
                                  'bad_partition', 'unreadable'])
def test_celeba_unusable_files_are_one_line_errors(tmp_path, case):
  root = str(tmp_path)
  _celeba(root)
  attrs = os.path.join(root, 'list_attr_celeba.txt')
  partition = os.path.join(root, 'list_eval_partition.txt')
  if case == 'no_attrs':
    os.remove(attrs)
    words = ['no list_attr_celeba.txt', 'looked in ., Anno']
  elif case == 'no_male_column':
    _touch(attrs, b'1\nSmiling Young\n000001.jpg 1 1\n')
    words = [attrs, 'no Male column']
  elif case == 'bad_partition':
    with open(partition, 'a') as f:
      f.write('000007.jpg 3\n')
    words = [partition, 'line 7']
  else:
    os.remove(attrs)
    os.mkdir(attrs)
    words = ['cannot read', attrs]
  with pytest.raises(sources.LayoutError) as error:
    sources.read_source('celeba', root)
  _one_line(error)
  for word in words:
    assert word in str(error.value)


# ------------------------------------------------------------------ csv --


def test_csv_rows_labels_splits_and_relative_paths(tmp_path):
  for name in ('a.jpg', 'b.jpg', 'c.jpg', 'd.jpg', 'e.jpg', 'f.jpg'):
    _touch(str(tmp_path / 'img' / name))
  listing = tmp_path / 'lists' / 'faces.csv'
  listing.parent.mkdir()
  listing.write_text(
      'path,label,split\n'
      '../img/a.jpg,male,train\n'
      '../img/b.jpg,Female,validation\n'
      '../img/c.jpg,1,test\n'
      '\n'
      '../img/d.jpg,0,\n'
      f'{tmp_path / "img" / "e.jpg"},M,Val\n'
      '../img/f.jpg,maybe,train\n'
      '../img/g.jpg,male,holdout\n'
      '../img/h.jpg\n'
      ',male\n')
  source = sources.read_source('csv', str(listing), val_fraction=0.2,
                               test_fraction=0.2)
  got = _labelled(source)
  assert {n: y for n, (y, _) in got.items()} == {
      'a.jpg': 1, 'b.jpg': 0, 'c.jpg': 1, 'd.jpg': 0, 'e.jpg': 1}
  assert [got[n][1] for n in ('a.jpg', 'b.jpg', 'c.jpg', 'e.jpg')] == [
      'train', 'validation', 'test', 'validation']
  want_d = sources.hash_split(
      sources.file_digest(str(tmp_path / 'img' / 'd.jpg')), 0.2, 0.2)
  assert got['d.jpg'][1] == want_d
  assert all(os.path.isfile(i.path) for i in source.items)
  assert sorted(r for _, r in source.skipped) == [
      "faces.csv line 10: no 'label' value",
      "faces.csv line 11: no 'path' value",
      "faces.csv line 8: label 'maybe': expected male|female|1|0 (or m/f, "
      'man/woman)',
      "faces.csv line 9: split 'holdout': expected train|validation|test or "
      'empty']


def test_csv_without_header_and_with_a_bom(tmp_path):
  for name in ('a.png', 'b.png'):
    _touch(str(tmp_path / name))
  listing = tmp_path / 'l.csv'
  listing.write_bytes(b'\xef\xbb\xbfa.png,female,train\r\nb.png,male,val\r\n')
  source = sources.read_source('csv', str(listing))
  assert _labelled(source) == {'a.png': (0, 'train'),
                               'b.png': (1, 'validation')}
  assert source.items[0].path == str(tmp_path / 'a.png')


def test_csv_header_names_its_columns_among_others(tmp_path):
  # FairFace's label files as they are: file,age,gender,race,service_test.
  names = [f'{i}.jpg' for i in range(12)]
  for name in names:
    _touch(str(tmp_path / 'train' / name))
  listing = tmp_path / 'fairface_label_train.csv'
  listing.write_text(
      'file,age,gender,race,service_test\n'
      + ''.join(f'train/{n},20-29,{"Male" if i % 2 else "Female"},White,True\n'
                for i, n in enumerate(names))
      + 'train/12.jpg,3-9,Girl,Indian,False\n'
      'train/13.jpg,20-29\n')
  source = sources.read_source('csv', str(listing), val_fraction=0.5,
                               test_fraction=0.0)
  assert _labelled(source) == {
      n: (i % 2, sources.hash_split(sources.file_digest(
          str(tmp_path / 'train' / n)), 0.5, 0.0))
      for i, n in enumerate(names)}
  assert sorted(r for _, r in source.skipped) == [
      "fairface_label_train.csv line 14: label 'Girl': expected "
      'male|female|1|0 (or m/f, man/woman)',
      "fairface_label_train.csv line 15: no 'gender' value"]
  # A split column is used wherever it stands, after a blank first line.
  listing.write_text('\nGender,Image,Partition\nm,train/0.jpg,val\n'
                     'f,train/1.jpg,train\n')
  assert _labelled(sources.read_source('csv', str(listing))) == {
      '0.jpg': (1, 'validation'), '1.jpg': (0, 'train')}
  # The old path,label,split shape keeps its meaning under other names: the
  # path is the first column, the split the third.
  for head in ('image_path,label,set', 'img,gender,fold'):
    listing.write_text(f'{head}\ntrain/0.jpg,m,val\ntrain/1.jpg,f,train\n')
    assert _labelled(sources.read_source('csv', str(listing))) == {
        '0.jpg': (1, 'validation'), '1.jpg': (0, 'train')}, head
  # A first row whose second cell is a label is data, not a header.
  _touch(str(tmp_path / 'sex'))
  listing.write_text('sex,male,train\ntrain/1.jpg,f,val\n')
  assert _labelled(sources.read_source('csv', str(listing))) == {
      'sex': (1, 'train'), '1.jpg': (0, 'validation')}
  # No image path column: refused in one line (a folder column names folders).
  for head in ('gender,age', 'identity,gender'):
    listing.write_text(f'{head}\nm,3\n')
    with pytest.raises(sources.LayoutError,
                       match='names no image path column') as e:
      sources.read_source('csv', str(listing))
    _one_line(e)
  # Rows without a header keep to path,label[,split].
  listing.write_text('train/0.jpg,m,val\ntrain/1.jpg,f,train,extra\n'
                     'train/2.jpg,f,train\ntrain/3.jpg,,train\n')
  source = sources.read_source('csv', str(listing))
  assert [r for _, r in source.skipped] == [
      'fairface_label_train.csv line 2: expected path,label[,split]',
      "fairface_label_train.csv line 4: label '': expected male|female|1|0 "
      '(or m/f, man/woman)']


def test_csv_unreadable_listed_files_are_skipped(tmp_path):
  listing = tmp_path / 'l.csv'
  _touch(str(tmp_path / 'a.jpg'))
  _touch(str(tmp_path / 'b.jpg'))
  listing.write_text('a.jpg,male,train\nb.jpg,female,validation\n'
                     'gone.jpg,male\n')
  source = sources.read_source('csv', str(listing))
  assert len(source.items) == 2
  (path, reason), = source.skipped
  assert path == str(tmp_path / 'gone.jpg')
  assert reason.startswith('FileNotFoundError')


@pytest.mark.parametrize('kind', ['csv', 'utkface', 'celeba', 'folders'])
def test_missing_source_is_one_line_layout_error(tmp_path, kind):
  with pytest.raises(sources.LayoutError) as error:
    sources.read_source(kind, str(tmp_path / 'nothing'))
  assert str(tmp_path / 'nothing') in str(error.value)
  if kind != 'folders':          # folders: the layout follows, on purpose.
    _one_line(error)


def test_source_without_usable_images_or_validation(tmp_path):
  _touch(str(tmp_path / 'u' / 'readme.txt'))
  with pytest.raises(sources.LayoutError, match='no usable image') as error:
    sources.read_source('utkface', str(tmp_path / 'u'))
  _one_line(error)
  listing = tmp_path / 'l.csv'
  _touch(str(tmp_path / 'a.jpg'))
  listing.write_text('a.jpg,male,train\n')
  with pytest.raises(sources.LayoutError, match='no validation images'):
    sources.read_source('csv', str(listing))
  with pytest.raises(sources.LayoutError, match='val_fraction') as error:
    sources.read_source('csv', str(listing), val_fraction=0.6,
                        test_fraction=0.5)
  _one_line(error)


# ---------------------------------------------------------- hash splits --


def test_hash_split_known_values_and_stable():
  def split(data):
    return sources.hash_split(hashlib.sha256(data).hexdigest(), 0.1, 0.1)
  # sha256 prefixes as fractions: b'face' 0.0098, b'c' 0.182, b'a' 0.791.
  assert [split(b'face'), split(b'c'), split(b'a')] == [
      'test', 'validation', 'train']
  assert [split(b'face'), split(b'c'), split(b'a')] == [
      'test', 'validation', 'train']
  assert sources.hash_split('0' * 64, 0.1, 0.1) == 'test'
  assert sources.hash_split('f' * 64, 0.1, 0.1) == 'train'
  assert sources.hash_split('0' * 64, 0.0, 0.0) == 'train'


def test_hash_split_fractions_over_many_digests():
  rng = np.random.default_rng(0)
  digests = [hashlib.sha256(rng.bytes(16)).hexdigest() for _ in range(2000)]
  got = collections.Counter(sources.hash_split(d, 0.15, 0.05)
                            for d in digests)
  assert abs(got['validation'] / 2000 - 0.15) < 0.03
  assert abs(got['test'] / 2000 - 0.05) < 0.02
  assert got['train'] + got['validation'] + got['test'] == 2000


def test_duplicates_never_cross_splits_and_runs_agree(tmp_path):
  rng = np.random.default_rng(1)
  contents = [rng.bytes(64) for _ in range(60)]
  folder = tmp_path / 'u'
  for i, data in enumerate(contents):   # Each content under 3 names.
    for copy in range(3):
      gender = (i + copy) % 2           # Even a conflicting label.
      _touch(str(folder / f'{20 + copy}_{gender}_0_2017010100000{i:04d}'
                 '.jpg.chip.jpg'), data)
  first = sources.read_source('utkface', str(folder), val_fraction=0.3,
                              test_fraction=0.3)
  again = sources.read_source('utkface', str(folder), val_fraction=0.3,
                              test_fraction=0.3)
  assert first.items == again.items and len(first.items) == 180
  by_content = collections.defaultdict(set)
  for item in first.items:
    with open(item.path, 'rb') as f:
      by_content[f.read()].add(item.split)
  assert len(by_content) == 60
  assert all(len(splits) == 1 for splits in by_content.values())
  assert len(set.union(*by_content.values())) == 3
