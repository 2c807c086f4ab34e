//! Writing user files safely: every write goes to a temporary file in the destination folder
//! and is then renamed into place, so a crash or a full disk never leaves half a file where a
//! good one was.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tempfile::NamedTempFile;

/// The PNG text-chunk keyword under which saved images carry their workflow.
pub const PNG_WORKFLOW_KEY: &str = "flowline-workflow";

/// Replaces `path` with `bytes` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, |temporary| Ok(fs::write(temporary, bytes)?))
}

/// Replaces `path` atomically with what `write` puts in the temporary file it is given, for
/// writers that want a path (such as safetensors). The file keeps the permissions of the file
/// it replaces, or gets the usual `rw-r--r--`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let file = temp_beside(path)?;
    write(file.path()).with_context(|| format!("cannot write {}", path.display()))?;
    fs::File::open(file.path())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let permissions = match fs::metadata(path) {
        Ok(existing) => existing.permissions(),
        Err(_) => usual_permissions(file.as_file())?,
    };
    fs::set_permissions(file.path(), permissions)?;
    file.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Writes `tensors` to `path` as safetensors, atomically.
pub fn save_safetensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> anyhow::Result<()> {
    write_atomic_with(path, |temporary| {
        Ok(candle_core::safetensors::save(tensors, temporary)?)
    })
}

/// Read-write for the owner and readable by others, as files a program creates usually are
/// (temporary files start private).
fn usual_permissions(file: &fs::File) -> std::io::Result<fs::Permissions> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = file;
        Ok(fs::Permissions::from_mode(0o644))
    }
    #[cfg(not(unix))]
    {
        file.metadata().map(|m| m.permissions())
    }
}

/// Saves `image` as `PREFIX_NNNNN.png` with the first number not yet taken, never replacing an
/// existing file, and returns the path written. `workflow` is stored in an iTXt chunk.
pub fn save_png_numbered(
    prefix: &Path,
    image: &image::RgbImage,
    workflow: Option<&String>,
) -> anyhow::Result<PathBuf> {
    let mut file = temp_beside(prefix)?;
    encode_png(file.as_file_mut(), image, workflow)?;
    file.as_file().sync_all()?;
    file.as_file()
        .set_permissions(usual_permissions(file.as_file())?)?;
    let stem = prefix
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for number in 1.. {
        let candidate = prefix.with_file_name(format!("{stem}_{number:05}.png"));
        match file.persist_noclobber(&candidate) {
            Ok(_) => return Ok(candidate),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => file = e.file,
            Err(e) => {
                return Err(e.error)
                    .with_context(|| format!("cannot write {}", candidate.display()));
            }
        }
    }
    unreachable!("some number is free")
}

/// Saves `image` as a PNG at `path`, replacing it atomically; `workflow` goes in an iTXt chunk.
pub fn save_png(
    path: &Path,
    image: &image::RgbImage,
    workflow: Option<&String>,
) -> anyhow::Result<()> {
    write_atomic_with(path, |temporary| {
        encode_png(&mut fs::File::create(temporary)?, image, workflow)
    })
}

fn encode_png(
    file: &mut fs::File,
    image: &image::RgbImage,
    workflow: Option<&String>,
) -> anyhow::Result<()> {
    let mut encoder = png::Encoder::new(BufWriter::new(file), image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(json) = workflow {
        encoder.add_itxt_chunk(PNG_WORKFLOW_KEY.to_string(), json.clone())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(())
}

/// The workflow JSON a PNG saved by Flowline carries, or `None` for a PNG without one.
pub fn read_png_workflow(path: &Path) -> anyhow::Result<Option<String>> {
    read_png_text(path, PNG_WORKFLOW_KEY)
}

/// The text a PNG carries under `keyword`, from its first iTXt, tEXt or zTXt chunk of that
/// keyword (ComfyUI, for one, stores its workflows in tEXt chunks named `workflow` and
/// `prompt`), or `None` where it has none.
pub fn read_png_text(path: &Path, keyword: &str) -> anyhow::Result<Option<String>> {
    let file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let info = reader.info();
    let corrupt = || format!("{}: the {keyword} chunk is corrupt", path.display());
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == keyword) {
        return chunk.get_text().map(Some).with_context(corrupt);
    }
    if let Some(chunk) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == keyword)
    {
        return Ok(Some(chunk.text.clone()));
    }
    info.compressed_latin1_text
        .iter()
        .find(|c| c.keyword == keyword)
        .map(|chunk| chunk.get_text().with_context(corrupt))
        .transpose()
}

fn temp_beside(path: &Path) -> anyhow::Result<NamedTempFile> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&folder)
        .with_context(|| format!("cannot create folder {}", folder.display()))?;
    NamedTempFile::new_in(&folder)
        .with_context(|| format!("cannot write in folder {}", folder.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_saves_never_replace_and_carry_the_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("sub/out");
        let image = image::RgbImage::from_pixel(4, 3, image::Rgb([10, 20, 30]));
        let json = "{\"format\":\"flowline-workflow\"}".to_string();
        let first = save_png_numbered(&prefix, &image, Some(&json)).unwrap();
        let second = save_png_numbered(&prefix, &image, None).unwrap();
        assert_eq!(first.file_name().unwrap(), "out_00001.png");
        assert_eq!(second.file_name().unwrap(), "out_00002.png");
        let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(&first).unwrap()));
        let reader = decoder.read_info().unwrap();
        let chunk = &reader.info().utf8_text[0];
        assert_eq!(chunk.keyword, PNG_WORKFLOW_KEY);
        assert_eq!(chunk.get_text().unwrap(), json);
        assert_eq!(read_png_workflow(&first).unwrap(), Some(json.clone()));
        assert_eq!(read_png_workflow(&second).unwrap(), None);
        assert_eq!(image::open(&second).unwrap().to_rgb8(), image);
        let leftovers = fs::read_dir(dir.path().join("sub")).unwrap().count();
        assert_eq!(leftovers, 2, "no temporary files are left behind");
    }

    #[test]
    fn text_chunks_are_read_by_keyword_whichever_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("comfy.png");
        let file = fs::File::create(&path).unwrap();
        let mut encoder = png::Encoder::new(BufWriter::new(file), 1, 1);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .add_text_chunk("prompt".into(), "{}".into())
            .unwrap();
        encoder
            .add_ztxt_chunk("workflow".into(), "{\"nodes\": []}".into())
            .unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0, 0, 0]).unwrap();
        writer.finish().unwrap();
        assert_eq!(
            read_png_text(&path, "prompt").unwrap().as_deref(),
            Some("{}")
        );
        assert_eq!(
            read_png_text(&path, "workflow").unwrap().as_deref(),
            Some("{\"nodes\": []}")
        );
        assert_eq!(read_png_text(&path, "parameters").unwrap(), None);
        assert_eq!(read_png_workflow(&path).unwrap(), None);
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "a new file is readable by others, not private");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            write_atomic(&path, b"three").unwrap();
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "a replaced file keeps its permissions");
        }
    }
}
