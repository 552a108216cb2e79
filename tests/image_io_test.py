"""Tests for gender_jax.image_io: every PIL mode decodes to the right pixels.

Each case saves one 8-bit face in some mode and compares the decode with a
reference computed here in numpy from the 8-bit original (tolerance 1).
"""

import numpy as np
from PIL import Image
import pytest

from gender_jax import image_io
from gender_jax import synthetic

SIZE = (46, 38)   # (H, W), native size: no resize in the mode tests.


@pytest.fixture(scope='module')
def face():
  rgb = synthetic.face_image(np.random.default_rng(0), False, SIZE)
  grey = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
  ramp = np.linspace(0, 255, SIZE[0] * SIZE[1]).reshape(SIZE)
  alpha = ramp.astype(np.uint8)[::-1]   # 255 (opaque) .. 0 (transparent).
  return rgb, grey, alpha


def _grey3(grey):
  return np.repeat(np.asarray(grey, np.float64)[..., None], 3, axis=2)


def _over_black(colour, alpha):
  return np.asarray(colour, np.float64) * alpha[..., None] / 255


def _save(image, tmp_path, fmt, name=None, **kwargs):
  path = str(tmp_path / (name or f'image.{fmt.lower()}'))
  image.save(path, fmt, **kwargs)
  return path


def _palette(rgb):
  """A palette image of `rgb` and its numpy lookup (index -> colour)."""
  p = Image.fromarray(rgb).quantize(32)
  lut = np.array(p.getpalette(), np.float64).reshape(-1, 3)
  return p, np.asarray(p), lut


def _case(name, face, tmp_path):
  """(path or in-memory PIL image, expected mode after opening, expected)."""
  rgb, grey, alpha = face
  g16 = grey.astype(np.uint16) * 257
  if name == 'RGB':
    return _save(Image.fromarray(rgb), tmp_path, 'PNG'), 'RGB', rgb
  if name == 'L':
    return _save(Image.fromarray(grey), tmp_path, 'PNG'), 'L', _grey3(grey)
  if name == '1':
    bits = grey > 128
    return (_save(Image.fromarray(bits), tmp_path, 'PNG'), '1',
            _grey3(np.where(bits, 255, 0)))
  if name == 'P':
    p, index, lut = _palette(rgb)
    return _save(p, tmp_path, 'PNG'), 'P', lut[index]
  if name == 'P+transparency':
    p, index, lut = _palette(rgb)
    clear = int(index[0, 0])
    expected = np.where((index == clear)[..., None], 0, lut[index])
    return _save(p, tmp_path, 'PNG', transparency=clear), 'P', expected
  if name == 'PA':
    p, index, lut = _palette(rgb)
    pa = p.convert('PA')
    pa.putalpha(Image.fromarray(alpha))
    return _save(pa, tmp_path, 'TIFF'), 'PA', _over_black(lut[index], alpha)
  if name == 'LA':
    la = Image.merge('LA', (Image.fromarray(grey), Image.fromarray(alpha)))
    return _save(la, tmp_path, 'PNG'), 'LA', _over_black(_grey3(grey), alpha)
  if name == 'RGBA':
    rgba = Image.fromarray(np.dstack([rgb, alpha]), 'RGBA')
    return _save(rgba, tmp_path, 'PNG'), 'RGBA', _over_black(rgb, alpha)
  if name == 'CMYK':
    k = grey // 4
    cmyk = np.dstack([255 - rgb, k]).astype(np.uint8)
    expected = rgb * (255. - k[..., None]) / 255
    return (_save(Image.fromarray(cmyk, 'CMYK'), tmp_path, 'TIFF'), 'CMYK',
            expected)
  if name == 'YCbCr':
    r, g, b = np.moveaxis(rgb.astype(np.float64), 2, 0)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    ycc = np.rint(np.clip(np.dstack([
        y, 128 + (b - y) / 1.772, 128 + (r - y) / 1.402]), 0, 255))
    y, cb, cr = np.moveaxis(ycc, 2, 0)
    expected = np.clip(np.dstack([
        y + 1.402 * (cr - 128),
        y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
        y + 1.772 * (cb - 128)]), 0, 255)
    image = Image.fromarray(ycc.astype(np.uint8), 'YCbCr')
    return _save(image, tmp_path, 'TIFF'), 'YCbCr', expected
  if name == 'I;16 PNG':
    return _save(Image.fromarray(g16), tmp_path, 'PNG'), 'I;16', _grey3(grey)
  if name == 'I;16B TIFF':
    return (_save(Image.fromarray(g16.astype('>u2')), tmp_path, 'TIFF'),
            'I;16B', _grey3(grey))
  if name == 'I;16L':
    image = Image.frombytes('I;16L', SIZE[::-1], g16.astype('<u2').tobytes())
    return image, 'I;16L', _grey3(grey)
  if name == 'I 16-bit PGM':
    return _save(Image.fromarray(g16), tmp_path, 'PPM', 'image.pgm'), 'I', \
        _grey3(grey)
  if name == 'I 32-bit TIFF':   # Signed: 0..2**31 - 1 holds the data.
    values = (grey.astype(np.int32) << 23) + 0x7ABCDE
    return (_save(Image.fromarray(values), tmp_path, 'TIFF'), 'I',
            _grey3(grey))
  if name == 'F 0..1':
    return (_save(Image.fromarray(grey.astype(np.float32) / 255), tmp_path,
                  'TIFF'), 'F', _grey3(grey))
  if name == 'F 0..255':
    return (_save(Image.fromarray(grey.astype(np.float32)), tmp_path, 'TIFF'),
            'F', _grey3(grey))
  raise ValueError(name)


MODES = ('RGB', 'L', '1', 'P', 'P+transparency', 'PA', 'LA', 'RGBA', 'CMYK',
         'YCbCr', 'I;16 PNG', 'I;16B TIFF', 'I;16L', 'I 16-bit PGM',
         'I 32-bit TIFF', 'F 0..1', 'F 0..255')


@pytest.mark.parametrize('name', MODES)
def test_every_mode_decodes_to_reference(face, tmp_path, name):
  source, mode, expected = _case(name, face, tmp_path)
  if isinstance(source, str):
    with Image.open(source) as image:
      assert image.mode == mode   # The case tests the mode it names.
    got, reason = image_io.decode(source, SIZE)
    assert reason == ''
  else:
    assert source.mode == mode
    got = image_io.to_model_input(source, SIZE)
  assert got.dtype == np.uint8 and got.shape == (*SIZE, 3)
  assert np.abs(got - np.asarray(expected, np.float64)).max() <= 1, name


def test_16_bit_grey_is_not_white(face, tmp_path):
  """The reported bug: PIL's convert('RGB') clips I;16 to an all-white face."""
  _, grey, _ = face
  path = _save(Image.fromarray(grey.astype(np.uint16) * 257), tmp_path, 'PNG')
  image, _ = image_io.decode(path, SIZE)
  assert abs(image.mean() - grey.mean()) < 0.5
  assert grey.mean() < 200


def test_resize_is_bilinear_after_conversion(face, tmp_path):
  rgb, _, alpha = face
  path = _save(Image.fromarray(np.dstack([rgb, alpha]), 'RGBA'), tmp_path,
               'PNG')
  composited = np.rint(_over_black(rgb, alpha)).astype(np.uint8)
  expected = np.asarray(Image.fromarray(composited).resize((20, 24),
                                                           Image.BILINEAR))
  got, _ = image_io.decode(path, (24, 20))
  assert got.shape == (24, 20, 3)
  assert np.abs(got.astype(int) - expected).max() <= 1


@pytest.mark.parametrize('orientation,turn', [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(face, tmp_path, orientation, turn):
  rgb, _, _ = face
  plain = _save(Image.fromarray(rgb), tmp_path, 'JPEG', 'plain.jpg',
                quality=95)
  exif = Image.Exif()
  exif[0x0112] = orientation   # Orientation: how a viewer must turn it.
  tagged = _save(Image.fromarray(rgb), tmp_path, 'JPEG', 'tagged.jpg',
                 quality=95, exif=exif)
  upright = np.rot90(image_io.decode(plain, SIZE)[0], turn)
  got, reason = image_io.decode(tagged, upright.shape[:2])
  assert reason == ''
  np.testing.assert_array_equal(got, upright)


def test_decode_gives_reasons_not_exceptions(tmp_path):
  empty = tmp_path / 'empty.jpg'
  empty.write_bytes(b'')
  text = tmp_path / 'text.png'
  text.write_text('not an image')
  cases = {str(empty): 'ValueError: empty file (0 bytes)',
           str(text): 'UnidentifiedImageError: cannot identify image file',
           str(tmp_path / 'missing.jpg'): 'FileNotFoundError: '}
  for path, reason in cases.items():
    image, got = image_io.decode(path, SIZE)
    assert image is None and got.startswith(reason), (path, got)
    assert '\n' not in got


def test_load_images_marks_failures(face, tmp_path):
  rgb, _, _ = face
  good = _save(Image.fromarray(rgb), tmp_path, 'PNG')
  bad = str(tmp_path / 'bad.jpg')
  with open(bad, 'wb') as f:
    f.write(b'\xff\xd8 truncated')
  images, errors = image_io.load_images([good, bad], SIZE, num_workers=2)
  np.testing.assert_array_equal(images[0], rgb)
  assert not images[1].any() and list(errors) == [1]
  assert errors[1].startswith(('OSError', 'UnidentifiedImageError'))


# ---------------------------------------------------------------- framing --


def _columns(height, width):
  """RGB image whose red channel is the column index (and green the row)."""
  cols, rows = np.meshgrid(np.arange(width), np.arange(height))
  return Image.fromarray(np.dstack([cols, rows, np.full_like(cols, 200)])
                         .astype(np.uint8))


@pytest.mark.parametrize('resize', image_io.RESIZE_MODES)
@pytest.mark.parametrize('shape', [(24, 80), (90, 20), (48, 40), (12, 10)])
def test_frame_gives_model_size_in_every_mode(resize, shape):
  image = _columns(*shape)
  got = image_io.frame(image, (24, 20), resize)
  assert got.size == (20, 24) and got.mode == 'RGB'
  if shape[0] * 20 == shape[1] * 24:   # Already the model's aspect: no change.
    assert got.tobytes() == image_io.frame(image, (24, 20)).tobytes()


def test_frame_crop_keeps_the_centre():
  wide = np.asarray(image_io.frame(_columns(24, 80), (24, 20), 'crop'))
  np.testing.assert_array_equal(wide[..., 0], np.tile(np.arange(30, 50),
                                                      (24, 1)))
  tall = np.asarray(image_io.frame(_columns(60, 20), (24, 20), 'crop'))
  np.testing.assert_array_equal(
      tall[..., 1], np.tile(np.arange(18, 42)[:, None], (1, 20)))
  stretched = np.asarray(image_io.frame(_columns(24, 80), (24, 20)))
  assert stretched[..., 0].min() < 5 and stretched[..., 0].max() > 74


def test_frame_pad_centres_the_whole_image_on_black():
  # 10 wide x 48 tall -> padded to 40 x 48 (aspect 20:24), then halved.
  got = np.asarray(image_io.frame(Image.new('RGB', (10, 48), (255, 255, 255)),
                                  (24, 20), 'pad'))
  assert not got[:, :7].any() and not got[:, 13:].any()
  assert (got[:, 8:12] == 255).all()
  wide = np.asarray(image_io.frame(Image.new('RGB', (80, 24), (9, 9, 9)),
                                   (24, 20), 'pad'))
  assert not wide[:8].any() and not wide[16:].any()   # Content: rows 9-15.
  assert (wide[10:14] == 9).all()


def test_frame_rejects_unknown_mode():
  with pytest.raises(ValueError, match="resize='fit'"):
    image_io.frame(_columns(4, 4), (4, 4), 'fit')


def test_box_region_margin_and_clipping():
  assert image_io.box_region((10, 20, 30, 40), 0.1, (100, 100)) == (
      7, 16, 43, 64)
  assert image_io.box_region((10, 20, 30, 40), 0.0, (100, 100)) == (
      10, 20, 40, 60)
  assert image_io.box_region((-5, 90, 20, 20), 0.5, (100, 100)) == (
      0, 80, 25, 100)
  with pytest.raises(ValueError, match='outside the 100x100 image'):
    image_io.box_region((200, 20, 10, 10), 0.2, (100, 100))
  with pytest.raises(ValueError, match='must be > 0'):
    image_io.box_region((1, 2, 0, 5), 0.0, (100, 100))


def test_frame_with_box_cuts_out_the_face(tmp_path):
  pixels = np.zeros((100, 120, 3), np.uint8)
  pixels[30:70, 40:70] = 255                     # The "face": 30 wide, 40 tall.
  path = str(tmp_path / 'photo.png')
  Image.fromarray(pixels).save(path)
  face, reason = image_io.decode(path, (24, 18), 'stretch', (40, 30, 30, 40))
  assert reason == '' and (face == 255).all()
  loose, _ = image_io.decode(path, (24, 18), 'crop', (40, 30, 30, 40), 0.5)
  assert (loose[12, 9] == 255).all() and not loose[0, 0].any()
  _, reason = image_io.decode(path, (24, 18), 'crop', (500, 30, 30, 40))
  assert reason.startswith('ValueError: face box') and 'outside' in reason


def test_read_boxes_vggface2_csv_and_find_box(tmp_path):
  path = tmp_path / 'loose_bb_test.csv'
  path.write_text('"NAME_ID","X","Y","W","H"\n'
                  '"n000001/0001_01",60,64,79,109\n'
                  'n000001/0002_01,-3,7.5,102,144\n'
                  '\n'
                  './other/a.b.jpg,1,2,3,4\n')
  boxes = image_io.read_boxes(str(path))
  assert len(boxes) == 3
  assert image_io.find_box(boxes, 'n000001/0001_01.jpg') == (60, 64, 79, 109)
  assert image_io.find_box(boxes, 'n000001/0001_01') == (60, 64, 79, 109)
  assert image_io.find_box(boxes, 'n000001/0002_01.png') == (-3, 7.5, 102,
                                                              144)
  assert image_io.find_box(boxes, 'other/a.b.png') == (1, 2, 3, 4)
  assert image_io.find_box(boxes, 'n000001/0003_01.jpg') is None
  assert image_io.find_box(None, 'n000001/0001_01.jpg') is None


@pytest.mark.parametrize('text,words', [
    ('NAME_ID,X,Y,W,H\na,1,2,3,4\nb,1,2,x,4\n', ['line 3', 'x']),
    ('NAME_ID,X,Y,W,H\na,1,2,3,4\n\nb,1,2,0,4\n', ['line 4', '> 0']),
    ('a,1,2,3\nb,1,2,3,4\n', ['line 1', 'expected path,x,y,w,h']),
    ('a,1,2,nan,4\n', ['line 1']),
    ('NAME_ID,X,Y,W,H\n', ['no face boxes']),
])
def test_read_boxes_bad_rows_name_the_line(tmp_path, text, words):
  path = tmp_path / 'boxes.csv'
  path.write_text(text)
  with pytest.raises(ValueError) as error:
    image_io.read_boxes(str(path))
  assert str(path) in str(error.value) and '\n' not in str(error.value)
  for word in words:
    assert word in str(error.value)


def test_load_images_frames_like_decode(tmp_path):
  path = str(tmp_path / 'wide.png')
  _columns(24, 80).save(path)
  boxes = [None, (10, 0, 40, 24)]
  images, errors = image_io.load_images([path, path], (24, 20), 1, 'crop',
                                        boxes, 0.1)
  assert not errors
  for image, box in zip(images, boxes):
    np.testing.assert_array_equal(
        image, image_io.decode(path, (24, 20), 'crop', box, 0.1)[0])
  assert not np.array_equal(images[0], images[1])
